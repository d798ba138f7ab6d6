"""EtcdStore against a real etcd: one member, and a 3-member cluster that loses a member mid-way."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from agent_scripts.harness import wait_for
from conftest import ROOT
from etcd_cluster import EtcdCluster
from ports import free_port

import store
from rendezvous import EtcdStore, _etcd_parse_endpoints

HANG_GUARD = 60.0


@pytest.fixture
def etcd(etcd_binary, tmp_path):
    with EtcdCluster(etcd_binary, tmp_path, size=1) as cluster:
        yield cluster


@pytest.fixture
def cluster3(etcd_binary, tmp_path):
    with EtcdCluster(etcd_binary, tmp_path, size=3) as cluster:
        yield cluster


def _child(code, *args):
    """A Python child that can import the project; stdout is a pipe we read lines from."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", code] + [str(a) for a in args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def _reap(procs):
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


# ------------------------------------------------------------------------------------------ parsing

def test_endpoints_parse_lists_strings_and_default_port():
    assert _etcd_parse_endpoints("http://127.0.0.1:1234, http://127.0.0.1") == [
        ("http://127.0.0.1:1234", "127.0.0.1", 1234), ("http://127.0.0.1", "127.0.0.1", 2379)]
    assert _etcd_parse_endpoints(["127.0.0.1:5"]) == [("http://127.0.0.1:5", "127.0.0.1", 5)]
    assert _etcd_parse_endpoints(["http://[::1]:7"])[0][1:] == ("::1", 7)
    for bad in ("", "https://127.0.0.1:1", "http://127.0.0.1:x", " , "):
        with pytest.raises(ValueError):
            _etcd_parse_endpoints(bad)


def test_unreachable_endpoints_raise_connection_error_after_timeout():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(store.StoreConnectionError) as info:
        EtcdStore("http://127.0.0.1:%d,http://127.0.0.1:%d" % (port, port), timeout=0.5)
    assert "127.0.0.1:%d" % port in str(info.value)
    assert time.monotonic() - started < HANG_GUARD


# ------------------------------------------------------------------------------------- one member

def test_every_operation_with_torch_semantics(etcd):
    with EtcdStore(etcd.endpoints, prefix="job", timeout=10) as s:
        s.set("a", "1")
        s.set("b", b"\x00\xffbin")
        assert s.get("a") == b"1" and s.get("b") == b"\x00\xffbin"
        assert s.add("n", 5) == 5 and s.add("n", -7) == -2 and s.get("n") == b"-2"
        # compare_set: missing key + non-empty expected -> expected, nothing stored
        assert s.compare_set("c", "x", "y") == b"x" and not s.check(["c"])
        # missing key + empty expected -> stored
        assert s.compare_set("c", "", "y") == b"y" and s.get("c") == b"y"
        assert s.compare_set("c", "y", "z") == b"z"          # match -> desired
        assert s.compare_set("c", "nope", "w") == b"z"       # mismatch -> current, unchanged
        s.append("log", "ab")
        s.append("log", b"cd")
        assert s.get("log") == b"abcd"
        s.multi_set(["m1", "m2"], ["v1", b"v2"])
        assert s.multi_get(["m1", "m2", "a"]) == [b"v1", b"v2", b"1"]
        assert s.check(["a", "m1"]) and not s.check(["a", "missing"])
        assert s.num_keys() == 7                            # a b n c log m1 m2; append's marker not counted
        assert s.delete_key("a") is True and s.delete_key("a") is False
        assert s.num_keys() == 6
        with pytest.raises(store.StoreError, match="not an integer"):
            s.add("log", 1)
        assert s.add("n", 2) == 0                           # still usable after the error
        with pytest.raises(TypeError):
            s.set(1, "x")
        with pytest.raises(TypeError):
            s.check("a")
        with pytest.raises(ValueError):
            s.multi_set(["x"], [])
        s.set_timeout(3)
        assert s.timeout == 3
        big = os.urandom(512 * 1024)
        s.set("big", big)
        assert s.get("big") == big
        # many keys at once: more than one transaction's worth of operations
        keys = ["k%d" % i for i in range(300)]
        s.multi_set(keys, keys)
        assert s.multi_get(keys) == [k.encode() for k in keys] and s.check(keys)
    with EtcdStore(etcd.endpoints, prefix="other", timeout=10) as other:  # prefixes never mix
        assert other.num_keys() == 0 and not other.check(["n"])
    with EtcdStore(etcd.endpoints, prefix="job", timeout=10) as again:
        assert again.get("n") == b"0"
        with pytest.raises(store.StoreConnectionError):
            again.close()
            again.get("n")


def _revision(s):
    return s._call("/kv/range", {"key": "eA==", "count_only": True})["header"]["revision"]


def test_add_of_zero_reads_without_writing_once_the_key_exists(etcd):
    # agents poll num_nodes_waiting() and heartbeats with add(key, 0) every few tenths of a second:
    # a write each time would grow etcd's history without end
    with EtcdStore(etcd.endpoints, prefix="job", timeout=10) as s:
        assert s.add("polled", 0) == 0 and s.check(["polled"])     # created, as torch's add does
        before = _revision(s)
        assert [s.add("polled", 0) for _ in range(20)] == [0] * 20
        assert _revision(s) == before
        assert s.add("polled", 3) == 3 and s.add("polled", 0) == 3
        s.set("text", "x")
        with pytest.raises(store.StoreError, match="not an integer"):
            s.add("text", 0)


def test_timeouts_name_the_keys_and_leave_the_client_usable(etcd):
    with EtcdStore(etcd.endpoints, prefix="t", timeout=0.3) as s:
        with pytest.raises(store.StoreTimeout, match="'never'"):
            s.get("never")
        with pytest.raises(TimeoutError, match="'x', 'y'"):
            s.wait(["x", "y"], timeout=0.2)
        s.set("x", "1")
        with pytest.raises(store.StoreTimeout, match="'y'"):
            s.wait(["x", "y"], timeout=0.2)
        s.set("y", "2")
        s.wait(["x", "y"])
        assert s.get("x") == b"1"
        s.wait([], timeout=0)


GETTER = """
import sys
from rendezvous import EtcdStore
with EtcdStore(sys.argv[1], prefix="w", timeout=60) as s:
    print(s.get("late").decode(), flush=True)
    s.wait(["a", "b"])
    print("both", flush=True)
"""


def test_get_blocks_on_a_watch_until_another_process_sets_the_key(etcd):
    proc = _child(GETTER, etcd.endpoints[0])
    try:
        # the getter has read the key as missing and opened its watch: only now set it
        wait_for(lambda: etcd.metric("etcd_debugging_mvcc_watcher_total") >= 1, HANG_GUARD, "the getter's watch")
        with EtcdStore(etcd.endpoints, prefix="w") as s:
            s.set("late", "hello")
            assert proc.stdout.readline() == b"hello\n"
            s.set("a", "1")
            wait_for(lambda: etcd.metric("etcd_debugging_mvcc_watcher_total") >= 1, HANG_GUARD, "the wait's watch")
            s.set("b", "2")
            assert proc.stdout.readline() == b"both\n"
        assert proc.wait(HANG_GUARD) == 0
    finally:
        _reap([proc])


ADDER = """
import sys
from rendezvous import EtcdStore
with EtcdStore(sys.argv[1], prefix="race", timeout=60) as s:
    s.get("go")
    print(" ".join(str(s.add("counter", 1)) for _ in range(int(sys.argv[2]))), flush=True)
"""


def test_concurrent_adds_from_processes_sum_exactly(etcd):
    procs, count = [], 40
    try:
        procs = [_child(ADDER, etcd.endpoints[0], count) for _ in range(4)]
        with EtcdStore(etcd.endpoints, prefix="race") as s:
            s.set("go", "1")
            seen = []
            for proc in procs:
                out, err = proc.communicate(timeout=HANG_GUARD)
                assert proc.returncode == 0, err.decode()
                seen += [int(v) for v in out.split()]
            assert sorted(seen) == list(range(1, 4 * count + 1))  # every add got its own value
            assert s.get("counter") == str(4 * count).encode()
    finally:
        _reap(procs)


CLAIMER = """
import sys
from rendezvous import EtcdStore
with EtcdStore(sys.argv[1], prefix="cas", timeout=60) as s:
    s.get("go")
    print(s.compare_set("owner", "", sys.argv[2]).decode(), flush=True)
"""


def test_compare_set_race_is_decided_once(etcd):
    procs = []
    try:
        procs = [_child(CLAIMER, etcd.endpoints[0], "p%d" % i) for i in range(5)]
        with EtcdStore(etcd.endpoints, prefix="cas") as s:
            s.set("go", "1")
            answers = [proc.communicate(timeout=HANG_GUARD)[0].decode().strip() for proc in procs]
            winner = s.get("owner").decode()
        assert answers == [winner] * 5 and winner in {"p%d" % i for i in range(5)}
    finally:
        _reap(procs)


EPHEMERAL = """
import sys, time
from rendezvous import EtcdStore
s = EtcdStore(sys.argv[1], prefix="eph", timeout=60, lease_ttl=2)
s.set_ephemeral("alive", "1")
s.set("plain", "1")
print("set", flush=True)
sys.stdin.read()   # until killed
"""


def test_ephemeral_keys_outlive_the_ttl_while_alive_and_vanish_after_sigkill(etcd):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", EPHEMERAL, etcd.endpoints[0]], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"set\n"
        with EtcdStore(etcd.endpoints, prefix="eph") as s:
            # the keep-alive thread renews the 2 s lease: the key must survive well past one ttl
            time.sleep(3.5)
            assert s.check(["alive"])
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            wait_for(lambda: not s.check(["alive"]), 20, "the dead client's ephemeral key to vanish")
            assert s.check(["plain"])
    finally:
        _reap([proc])


def test_wait_gone_wakes_on_a_delete_and_on_a_dead_clients_lease_ending(etcd):
    """wait_gone: at once when a key is missing, a timeout while all exist, and woken by a watch
    (no polling) when a key is deleted or a killed client's lease ends."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", EPHEMERAL, etcd.endpoints[0]], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"set\n"
        with EtcdStore(etcd.endpoints, prefix="eph", timeout=HANG_GUARD) as s:
            s.wait_gone(["alive", "missing"], 0.1)
            with pytest.raises(store.StoreTimeout):
                s.wait_gone(["alive", "plain"], 0.2)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            s.wait_gone(["plain", "alive"], HANG_GUARD)      # the 2 s lease ends: a DELETE event
            assert s.check(["plain"]) and not s.check(["alive"])
            woke = []
            t = threading.Thread(target=lambda: woke.append(s.wait_gone(["plain"], HANG_GUARD) or "woke"))
            t.start()
            time.sleep(0.2)    # usually watching by now; answered the same way if it was not
            with EtcdStore(etcd.endpoints, prefix="eph") as other:
                assert other.delete_key("plain")
            t.join(HANG_GUARD)
            assert woke == ["woke"]
    finally:
        _reap([proc])


def test_close_revokes_the_lease_at_once(etcd):
    with EtcdStore(etcd.endpoints, prefix="eph2", lease_ttl=30) as watcher:
        s = EtcdStore(etcd.endpoints, prefix="eph2", lease_ttl=30)
        s.set_ephemeral("alive", "1")
        s.set_ephemeral("alive2", "2")
        assert watcher.multi_get(["alive", "alive2"]) == [b"1", b"2"]
        s.close()
        assert not watcher.check(["alive"]) and not watcher.check(["alive2"])


# ------------------------------------------------------------------------------ 3-member cluster

FAILOVER_ADDER = """
import sys
from rendezvous import EtcdStore
with EtcdStore(sys.argv[1], prefix="fo", timeout=60) as s:
    s.get("go")
    for _ in range(int(sys.argv[2])):
        s.add("counter", 1)
    print("done", flush=True)
"""


def test_cluster_keeps_working_when_a_member_is_killed(cluster3):
    endpoints = ",".join(cluster3.endpoints)
    procs, count = [], 60
    try:
        with EtcdStore(endpoints, prefix="fo", timeout=60) as s:
            s.set("before", "1")
            current = s._members.current  # the member this client (and the adders) talk to first
            procs = [_child(FAILOVER_ADDER, endpoints, count) for _ in range(3)]
            blocked = {}
            getter = threading.Thread(target=lambda: blocked.update(v=s.get("after")), daemon=True)
            getter.start()
            wait_for(lambda: cluster3.metric("etcd_debugging_mvcc_watcher_total", current) >= 1, HANG_GUARD,
                     "the watch")
            s.set("go", "1")
            wait_for(lambda: int(s.get("counter")) >= count, HANG_GUARD, "the adders to get going")
            cluster3.kill(current)
            # the blocked get resumes its watch on another member; new writes go elsewhere too
            s.set("after", "yes")
            getter.join(HANG_GUARD)
            assert blocked.get("v") == b"yes"
            assert s.get("before") == b"1"
            assert s.add("mine", 2) == 2
            for proc in procs:
                out, err = proc.communicate(timeout=HANG_GUARD)
                assert out == b"done\n", err.decode()
            assert s.get("counter") == str(3 * count).encode()   # nothing lost, nothing counted twice
            assert s._members.current != current
    finally:
        _reap(procs)


def test_all_members_down_gives_connection_error_then_recovers(etcd):
    with EtcdStore(etcd.endpoints, prefix="down", timeout=1) as s:
        s.set("k", "v")
        etcd.kill(0)
        with pytest.raises(store.StoreConnectionError, match="127.0.0.1"):
            s.set("k", "w")
        with pytest.raises(store.StoreError):
            s.get("k")
        etcd.start(0)  # same data dir: the member comes back with its data
        s.set_timeout(20)
        assert s.get("k") == b"v"


# ------------------------------------------------------------------------- older gateway paths

class _GatewayFilter:
    """An HTTP front for a real etcd member that serves only the paths under `allowed` and answers
    every other path as etcd 3.3 answers /v3 (404, a text body): an etcd of another generation."""

    def __init__(self, member_port, allowed):
        import http.client
        import http.server
        self.paths = []
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                front.paths.append(self.path)
                if not self.path.startswith(allowed):
                    self._send(404, b"404 page not found\n")
                    return
                conn = http.client.HTTPConnection("127.0.0.1", member_port, timeout=HANG_GUARD)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower().startswith(("content-type", "grpc-"))}
                    conn.request("POST", self.path, body, headers)
                    resp = conn.getresponse()
                    if not self.path.endswith("/watch"):
                        self._send(resp.status, resp.read())
                        return
                    self.send_response(resp.status)   # a watch streams: pass each line on as it comes
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for line in iter(resp.readline, b""):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    self.close_connection = True
                finally:
                    conn.close()

            def _send(self, status, data):
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_gateway_under_v3beta_is_found_and_used_for_everything(etcd):
    # etcd 3.3 serves the JSON gateway under /v3beta only; 3.4 still serves it there too, so a real
    # 3.4 member behind a filter that refuses /v3 plays the older member
    front = _GatewayFilter(int(etcd.endpoints[0].rsplit(":", 1)[1]), allowed="/v3beta/")
    try:
        with EtcdStore([front.endpoint], prefix="old", timeout=10) as s:
            s.set("a", "1")
            assert s.add("n", 2) == 2 and s.get("a") == b"1"
            got = []
            t = threading.Thread(target=lambda: got.append(s.get("late")))
            t.start()
            wait_for(lambda: "/v3beta/watch" in front.paths, HANG_GUARD, "the get to watch")
            with EtcdStore([front.endpoint], prefix="old", timeout=10) as other:
                other.set("late", "here")
            t.join(HANG_GUARD)
            assert got == [b"here"]
        assert front.paths[:2] == ["/v3/kv/range", "/v3beta/kv/range"]   # /v3 probed first, refused
        assert {p for p in front.paths if not p.startswith("/v3beta/")} == {"/v3/kv/range"}   # only probes
    finally:
        front.close()


def test_an_http_server_without_the_gateway_is_named_clearly(etcd):
    front = _GatewayFilter(int(etcd.endpoints[0].rsplit(":", 1)[1]), allowed="/nothing/")
    try:
        with pytest.raises(store.StoreError, match="does not serve etcd's v3 JSON gateway"):
            EtcdStore([front.endpoint], prefix="none", timeout=5).set("a", "1")
        assert front.paths[:3] == ["/v3/kv/range", "/v3beta/kv/range", "/v3alpha/kv/range"]
    finally:
        front.close()
