"""Health check: GET /healthz over real HTTP on a free port, 200/503/404 with JSON bodies."""
import http.client
import json
import threading

import pytest

import elastic as ops

GUARD = 30  # seconds, a hang guard only


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


def test_slow_request_blocks_neither_other_requests_nor_stop():
    release = threading.Event()
    entered = threading.Event()

    def status():
        if not entered.is_set():
            entered.set()
            release.wait(GUARD)
        return True, {"state": "HEALTHY"}

    srv = ops._HealthServer(0, status, host="127.0.0.1")
    srv.start()
    slow = threading.Thread(target=lambda: fetch(srv.port), daemon=True)
    try:
        slow.start()
        assert entered.wait(GUARD)
        assert fetch(srv.port)[0] == 200  # served while the first request is still stuck
        srv.stop()                        # returns although a handler is still busy
    finally:
        release.set()
        srv.stop()
        slow.join(GUARD)
    with pytest.raises(OSError):
        fetch(srv.port)


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
