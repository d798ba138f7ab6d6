"""Health check: GET /healthz over real HTTP on a free port, 200/503/404 with JSON bodies."""
import http.client
import json
import os
import re
import signal
import socket
import sys
import textwrap
import threading

import pytest

import elastic as ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from agent_scripts.harness import Launcher, clean_env, wait_for, write_script  # noqa: E402

GUARD = 30  # seconds, a hang guard only
FAST = ["--monitor-interval", "0.05"]


def fetch(port, path="/healthz", method="GET"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, resp.getheader("Content-Type"), body
    finally:
        conn.close()


@pytest.fixture
def agent_state():
    return {"healthy": True, "state": "HEALTHY", "restart_count": 0, "group_rank": 0, "world_size": 2,
            "last_progress_time": 1700000000.5}


@pytest.fixture
def health(agent_state):
    def status():
        fields = dict(agent_state)
        return fields.pop("healthy"), fields
    srv = ops._HealthServer(0, status, host="127.0.0.1")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_healthy_then_restarting(health, agent_state):
    assert health.port > 0
    code, ctype, body = fetch(health.port)
    assert code == 200 and ctype == "application/json"
    data = json.loads(body)
    assert data == {"healthy": True, "state": "HEALTHY", "restart_count": 0, "group_rank": 0, "world_size": 2,
                    "last_progress_time": 1700000000.5}
    agent_state.update(healthy=False, state="UNHEALTHY", restart_count=1)
    code, _, body = fetch(health.port, "/healthz?verbose=1")
    assert code == 503
    data = json.loads(body)
    assert data["healthy"] is False and data["state"] == "UNHEALTHY" and data["restart_count"] == 1


def test_other_paths_404(health):
    for path in ("/", "/health", "/healthz/x"):
        code, ctype, body = fetch(health.port, path)
        assert code == 404 and ctype == "application/json" and "error" in json.loads(body)


def test_broken_status_is_503_and_server_keeps_serving():
    calls = []

    def status():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("agent state unavailable")
        return True, {"state": "HEALTHY"}

    srv = ops._HealthServer(0, status, host="127.0.0.1")
    srv.start()
    try:
        code, _, body = fetch(srv.port)
        assert code == 503 and "agent state unavailable" in json.loads(body)["error"]
        assert fetch(srv.port)[0] == 200
    finally:
        srv.stop()


def test_stop_returns_with_clients_connected(health):
    socks = slow_clients(health.port, 3)
    try:
        assert fetch(health.port)[0] == 200
        health.stop()
        for s in socks:  # stop() closed them
            assert s.recv(1024) == b""
    finally:
        for s in socks:
            s.close()
    with pytest.raises(OSError):
        fetch(health.port)


def test_ipv6_loopback():
    srv = ops._HealthServer(0, lambda: (True, {}), host="::1")
    try:
        srv.start()
    except OSError as e:
        pytest.skip("no IPv6 loopback here: %s" % e)
    try:
        conn = http.client.HTTPConnection("::1", srv.port, timeout=GUARD)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        srv.stop()


def test_status_fn_for_an_agent():
    class Agent:
        state = "HEALTHY"
        restart_count = 2
        group_rank = 1
        group_world_size = 4
        world_size = 16
        last_progress_time = 123.0

    agent = Agent()
    status = ops._health_status_fn(agent)
    assert status() == (True, {"state": "HEALTHY", "restart_count": 2, "group_rank": 1, "group_world_size": 4,
                               "world_size": 16, "last_progress_time": 123.0})
    agent.state = "UNHEALTHY"
    assert status()[0] is False


# /healthz of a real launcher (`python3 elastic.py ...`).
# The workers talk to the test through files in the folder argv[1]: mark(name) makes one,
# wait_file(name) waits (30 s at most) for the test to make one.
FILES = textwrap.dedent("""
    import os, signal, sys, time
    folder = sys.argv[1]

    def mark(name):
        open(os.path.join(folder, name), "w").close()

    def wait_file(name):
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(folder, name)) and time.monotonic() < deadline:
            time.sleep(0.01)
""")

HEALTH = FILES + textwrap.dedent("""
    rank, attempt = os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
    if attempt == "0" and rank == "0":
        mark("a0-r0")
        wait_file("fail")
        sys.exit(3)
    elif attempt == "0":
        # holds the restart open (ignores the agent's SIGTERM) until the test has seen the 503
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        mark("a0-r1")
        wait_file("seen-503")
    else:
        mark("a1-r%s" % rank)
        wait_file("finish")
""")


def get_health(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD)
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), json.loads(resp.read())
    finally:
        conn.close()


def health_until(port, code, **fields):
    """Ask /healthz until it answers `code` with `fields` (the agent moves on its own schedule)."""
    def check():
        got = get_health(port)
        return got if got[0] == code and all(got[2].get(k) == v for k, v in fields.items()) else None
    return wait_for(check, GUARD, "/healthz %d %r" % (code, fields))


def test_healthz_200_while_running_503_while_restarting(tmp_path):
    folder = tmp_path / "io"
    folder.mkdir()
    health = write_script(tmp_path, "health.py", HEALTH)
    a = Launcher(["--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--health-check-port", "0",
                  "--shutdown-timeout", str(GUARD)] + FAST + [health, str(folder)], tmp_path,
                 environ=clean_env())
    try:
        m = wait_for(lambda: re.search(r"health check on http://0\.0\.0\.0:(\d+)/healthz", a.err()), GUARD,
                     "the health-check port in the log")
        port = int(m.group(1))
        wait_for(lambda: (folder / "a0-r0").exists() and (folder / "a0-r1").exists(), GUARD, "attempt 0")
        code, ctype, body = health_until(port, 200)
        assert ctype == "application/json"
        assert body["state"] == "HEALTHY" and body["restart_count"] == 0 and body["healthy"] is True
        assert body["group_rank"] == 0 and body["group_world_size"] == 1 and body["world_size"] == 2
        assert isinstance(body["last_progress_time"], float)

        (folder / "fail").touch()     # rank 0 exits 3; rank 1 holds the teardown open
        code, _, body = health_until(port, 503)
        assert body["state"] in ("UNHEALTHY", "INIT") and body["healthy"] is False
        (folder / "seen-503").touch()

        wait_for(lambda: (folder / "a1-r0").exists() and (folder / "a1-r1").exists(), GUARD, "attempt 1")
        code, _, body = health_until(port, 200, restart_count=1)
        assert body["state"] == "HEALTHY"
        (folder / "finish").touch()
        assert a.wait(GUARD) == 0, a.err()
        assert "restarting the worker group (1/1)" in a.err()
    finally:
        a.stop()


STUBBORN = FILES + textwrap.dedent("""
    # takes its time over the launcher's SIGTERM: the test asks /healthz meanwhile
    signal.signal(signal.SIGTERM, lambda *a: (mark("got-sigterm"), wait_file("seen-503"), sys.exit(0)))
    mark("running")
    wait_file("never")
""")


def test_healthz_503_stopped_while_a_stop_signal_tears_the_group_down(tmp_path):
    folder = tmp_path / "io"
    folder.mkdir()
    stubborn = write_script(tmp_path, "stubborn.py", STUBBORN)
    a = Launcher(["--standalone", "--health-check-port", "0", "--shutdown-timeout", str(GUARD)] + FAST
                 + [stubborn, str(folder)], tmp_path, environ=clean_env())
    try:
        m = wait_for(lambda: re.search(r"health check on http://0\.0\.0\.0:(\d+)/healthz", a.err()), GUARD,
                     "the health-check port in the log")
        port = int(m.group(1))
        wait_for(lambda: (folder / "running").exists(), GUARD, "the worker")
        health_until(port, 200, state="HEALTHY")
        os.kill(a.pid, signal.SIGTERM)
        wait_for(lambda: (folder / "got-sigterm").exists(), GUARD, "the worker's SIGTERM")
        code, _, body = get_health(port)   # the state changes before the workers hear of the stop
        (folder / "seen-503").touch()
        assert (code, body["state"], body["healthy"]) == (503, "STOPPED", False)
        assert a.wait(GUARD) == 128 + signal.SIGTERM, a.err()
    finally:
        a.stop()


def slow_clients(port, n, partial=b"GET /healthz HTTP/1.1\r\nHost: x\r\n"):
    """n connections that send the start of a request and then nothing (a slowloris)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=GUARD)
            s.sendall(partial)
            socks.append(s)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def test_500_slow_connections_hold_no_threads_and_healthz_still_answers(health):
    before = threading.active_count()
    socks = slow_clients(health.port, 500)
    try:
        # the server has seen the slow connections before this one: accepted in arrival order
        code, _, body = fetch(health.port)
        assert code == 200 and json.loads(body)["state"] == "HEALTHY"
        assert threading.active_count() <= before, [t.name for t in threading.enumerate()]
    finally:
        for s in socks:
            s.close()
    assert fetch(health.port)[0] == 200


def test_slow_client_dropped_after_its_deadline_others_served():
    srv = ops._HealthServer(0, lambda: (True, {"state": "HEALTHY"}), host="127.0.0.1", request_timeout=0.5)
    srv.start()
    try:
        [slow] = slow_clients(srv.port, 1, partial=b"GET /hea")
        try:
            assert fetch(srv.port)[0] == 200  # served while the slow one is still waited for
            slow.settimeout(GUARD)
            assert slow.recv(1024) == b""     # then the slow one is closed, unanswered
        finally:
            slow.close()
        assert fetch(srv.port)[0] == 200
    finally:
        srv.stop()


def test_request_too_large_or_malformed_gets_a_status_not_a_hang(health):
    for data, code in ((b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
                       (b"NONSENSE\r\n\r\n", 400),
                       (b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405)):
        with socket.create_connection(("127.0.0.1", health.port), timeout=GUARD) as s:
            try:
                s.sendall(data)
            except OSError:  # the server may answer and close before all of a large request is in
                pass
            reply = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
        assert reply.startswith(b"HTTP/1.0 %d " % code), reply[:100]


WAITER = "import os, sys, time\nopen(os.path.join(sys.argv[1], 'ready'), 'w').close()\n" \
         "while not os.path.exists(os.path.join(sys.argv[1], 'go')):\n    time.sleep(0.01)\n"


def test_launcher_keeps_its_threads_under_500_slow_clients(tmp_path):
    import os
    import re
    from agent_scripts.harness import Launcher, wait_for
    script = tmp_path / "waiter.py"
    script.write_text(WAITER)
    launcher = Launcher(["--standalone", "--health-check-port", "0", str(script), str(tmp_path)], tmp_path)
    socks = []
    try:
        wait_for(lambda: (tmp_path / "ready").exists(), GUARD, "the worker")
        port = int(wait_for(lambda: re.search(r"http://[^:]+:(\d+)/healthz", launcher.err()),
                            GUARD, "the health-check port").group(1))

        def threads():
            return len(os.listdir("/proc/%d/task" % launcher.pid))
        before = threads()
        socks = slow_clients(port, 500)
        assert fetch(port)[0] == 200
        assert threads() <= before + 2, (before, threads())
        (tmp_path / "go").touch()
        assert launcher.wait(GUARD) == 0, launcher.err()
    finally:
        for s in socks:
            s.close()
        launcher.stop()
