"""store.py against hostile clients: each costs the server a bounded amount, and the others are served.

A client that pipelines requests and never reads the replies, one that parks requests without end,
one that floods the server with garbage handshakes (and a stderr nobody drains), an impostor server
that never asks for the token, and numbers at the edges of what the wire can carry. Servers run in
a separate process where the attack could take the process down (memory cap, blocked stderr), in a
thread of this process elsewhere; every client is a real socket on 127.0.0.1.
"""
import logging
import os
import socket
import struct
import subprocess
import sys
import threading

import pytest

import store
from store import StoreAuthError, StoreError, StoreServer, TCPStore

from conftest import ROOT
from test_store import closed_by_peer, field, frame, raw_connect, recv_frame, request

_GET, _SET, _ADD, _WAIT = 2, 1, 3, 5
MiB = 1024 * 1024

# A store server in its own process: optional address-space cap (so an attack that would grow it
# without bound dies of MemoryError instead of eating the machine) and optional stderr made full
# first (so any write to it blocks, as when stderr is a pipe nobody drains).
_SERVER = r"""
import fcntl, logging, os, resource, sys
cap, fill_stderr = int(sys.argv[1]), sys.argv[2] == "1"
if cap:
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
logging.basicConfig(level=logging.WARNING)
import store
srv = store.StoreServer("127.0.0.1", 0, local_socket=False)
if fill_stderr:
    flags = fcntl.fcntl(2, fcntl.F_GETFL)
    fcntl.fcntl(2, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        while True:
            os.write(2, b"x" * 4096)
    except BlockingIOError:
        pass
    fcntl.fcntl(2, fcntl.F_SETFL, flags)
print(srv.port, flush=True)
srv.serve_forever()
"""


class ServerProcess:
    def __init__(self, cap=0, fill_stderr=False):
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(cap), "1" if fill_stderr else "0"],
                                     cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE if fill_stderr else None,
                                     env=dict(os.environ, PYTHONPATH=ROOT))
        line = self.proc.stdout.readline()
        assert line.strip().isdigit(), "the server did not start"
        self.port = int(line)

    def rss_mib(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        return 0.0

    def kill(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def capped_server():
    srv = ServerProcess(cap=512 * MiB)
    try:
        yield srv
    finally:
        srv.kill()


def get_frame(rid, key, timeout_ms=-1):
    return request(_GET, rid, struct.pack(">qI", timeout_ms, 1) + field(key))


def send_without_reading(sock, data):
    """Send as much of `data` as the kernel takes without blocking: the client never reads."""
    sock.setblocking(False)
    sent = 0
    try:
        while sent < len(data):
            sent += sock.send(data[sent:sent + 65536])
    except BlockingIOError:
        pass
    sock.setblocking(True)
    return sent


def read_replies(sock, count):
    """{request id: (status, body)} of the next `count` replies."""
    replies = {}
    for _ in range(count):
        payload = recv_frame(sock)
        status, rid = struct.unpack_from(">BI", payload)
        assert rid not in replies
        replies[rid] = (status, payload[5:])
    return replies


def guard_is_served(port, key="guard"):
    with TCPStore("127.0.0.1", port, timeout=60) as guard:
        guard.set(key, "ok")
        assert guard.get(key) == b"ok"
        assert guard.add(key + "-n", 1) == 1


# -------------------------------------------------------------------------------- back-pressure

def test_pipelined_gets_of_a_large_value_never_read_cost_a_bounded_amount(capped_server):
    # 2,000 gets of a 1 MiB value would queue 2 GiB of replies: the server (capped at 512 MiB of
    # address space) must stop reading the client instead, and go on serving the others
    with TCPStore("127.0.0.1", capped_server.port, timeout=60) as c:
        c.set("big", b"x" * MiB)
    attacker = raw_connect(capped_server.port)
    try:
        flood = b"".join(get_frame(rid, b"big", 0) for rid in range(2000))
        assert send_without_reading(attacker, flood) == len(flood)
        guard_is_served(capped_server.port)
        assert capped_server.rss_mib() < 200
        # and nothing was lost: a client that reads at last gets every reply, in full
        replies = read_replies(attacker, 2000)
        assert sorted(replies) == list(range(2000))
        assert all(status == 0 and body == field(b"x" * MiB) for status, body in replies.values())
    finally:
        attacker.close()


def test_parked_gets_answered_by_a_large_value_are_owed_not_copied(capped_server):
    # 1,000 gets parked on one key, never read: the set of a 1 MiB value makes 1 GiB of answers,
    # which the server must hand out as the client reads them
    attacker = raw_connect(capped_server.port)
    try:
        flood = b"".join(get_frame(rid, b"later") for rid in range(1000))
        flood += request(_SET, 1000, field(b"parked") + field(b"1"))   # done in order: after every get
        assert send_without_reading(attacker, flood) == len(flood)
        with TCPStore("127.0.0.1", capped_server.port, timeout=60) as c:
            c.wait(["parked"])
            c.set("later", b"y" * MiB)   # answers all 1,000 parked gets at once
        guard_is_served(capped_server.port)
        assert capped_server.rss_mib() < 200
        replies = read_replies(attacker, 1001)
        assert sorted(replies) == list(range(1001))
        assert all(status == 0 and body == field(b"y" * MiB) for rid, (status, body) in replies.items()
                   if rid < 1000)
    finally:
        attacker.close()


@pytest.mark.parametrize("local_socket", [False, True])
def test_a_client_that_reads_late_gets_every_reply(local_socket):
    srv = StoreServer("127.0.0.1", 0, local_socket=local_socket).start()
    sock = None
    try:
        key = "k" * 4096   # long keys: 120 MiB of requests, more than socket buffers hold
        with TCPStore("127.0.0.1", srv.port, timeout=10) as c:
            c.set(key, b"v" * 4096)
        sock = raw_connect(srv.port)
        # gets of a 4 KiB value between adds, sent until the server stops reading us (it has
        # replies queued that we do not read), then read while the rest goes out
        data = b"".join(request(_ADD, rid, field(b"n" + key.encode()) + struct.pack(">q", 1)) if rid % 3 == 2
                        else get_frame(rid, key.encode(), 0) for rid in range(30000))
        sent = send_without_reading(sock, data)
        assert sent < len(data)   # the server stopped reading: the rest is still ours to send
        rest = threading.Thread(target=sock.sendall, args=(data[sent:],))
        rest.start()
        replies = read_replies(sock, 30000)
        rest.join()
        assert sorted(replies) == list(range(30000))
        adds = sorted(struct.unpack(">q", body)[0] for rid, (status, body) in replies.items() if rid % 3 == 2)
        assert adds == list(range(1, 10001))
        assert all(body == field(b"v" * 4096) for rid, (status, body) in replies.items() if rid % 3 != 2)
    finally:
        if sock is not None:
            sock.close()
        srv.stop()


# -------------------------------------------------------------------------------- parked requests

def test_parked_requests_are_capped_per_connection_and_in_all_and_the_others_are_served():
    srv = StoreServer("127.0.0.1", 0, max_parked_per_connection=50, max_parked=100).start()
    socks = []
    try:
        first = raw_connect(srv.port)
        socks.append(first)
        first.sendall(b"".join(get_frame(rid, b"k%d" % rid) for rid in range(60)))
        refused = read_replies(first, 10)   # the 10 beyond its 50 are refused at once; 50 stay parked
        assert sorted(refused) == list(range(50, 60))
        for status, body in refused.values():
            assert status == 2 and b"max_parked_per_connection" in body
        second = raw_connect(srv.port)
        socks.append(second)
        second.sendall(b"".join(get_frame(rid, b"k%d" % rid) for rid in range(50)))
        third = raw_connect(srv.port)   # 100 parked in all: only the floor of 16 is left to others
        socks.append(third)
        third.sendall(b"".join(get_frame(rid, b"k%d" % rid) for rid in range(17)))
        (status, body), = read_replies(third, 1).values()
        assert status == 2 and b"max_parked)" in body
        with TCPStore("127.0.0.1", srv.port, timeout=10) as other:   # still parks, and is answered
            done = threading.Event()
            threading.Thread(target=lambda: (other.get("late"), done.set()), daemon=True).start()
            with TCPStore("127.0.0.1", srv.port, timeout=10) as setter:
                setter.set("late", "now")
                setter.multi_set(["k%d" % i for i in range(60)], ["v"] * 60)
            assert done.wait(30)
        assert len(read_replies(first, 50)) == 50 and len(read_replies(second, 50)) == 50
        assert len(read_replies(third, 16)) == 16
    finally:
        for sock in socks:
            sock.close()
        srv.stop()


def test_answered_requests_leave_no_deadline_behind():
    # a get that may wait an hour and is answered at once must not hold memory for the hour
    srv = StoreServer("127.0.0.1", 0, local_socket=False).start()
    sock = raw_connect(srv.port)
    try:
        # one wait that stays parked, with the nearest deadline: the others' entries end behind it
        sock.sendall(request(_WAIT, 0xFFFFFFFF, struct.pack(">qI", 1800000, 1) + field(b"never")))
        for batch in range(10):
            frames = []
            for i in range(1000):
                rid, key = 2 * (batch * 1000 + i), b"once-%d-%d" % (batch, i)
                frames.append(request(_WAIT, rid, struct.pack(">qI", 3600000, 1) + field(key)))
                frames.append(request(_SET, rid + 1, field(key) + field(b"1")))
            sock.sendall(b"".join(frames))
            read_replies(sock, 2000)
        assert len(srv._deadlines) < 3000
    finally:
        sock.close()
        srv.stop()


# -------------------------------------------------------------------------------- logging

def garbage_handshake(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(frame(b"GARBAGE"))
        assert closed_by_peer(sock)
    finally:
        sock.close()


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines, self.changed = [], threading.Condition()

    def emit(self, record):
        with self.changed:
            self.lines.append(record.getMessage())
            self.changed.notify_all()

    def wait_for(self, text, timeout=30):
        with self.changed:
            return self.changed.wait_for(lambda: any(text in line for line in self.lines), timeout)


@pytest.fixture
def store_log():
    lines = Lines()
    logger = logging.getLogger("store")
    logger.addHandler(lines)
    level, logger.level = logger.level, logging.WARNING
    try:
        yield lines
    finally:
        logger.removeHandler(lines)
        logger.level = level


def test_a_flood_of_bad_handshakes_is_logged_in_a_few_lines_and_summed_up(store_log):
    srv = StoreServer("127.0.0.1", 0).start()
    try:
        for _ in range(300):
            garbage_handshake(srv.port)
    finally:
        srv.stop()   # sums up the window in progress
    assert store_log.wait_for("more bad connections from 127.0.0.1")
    assert len(store_log.lines) == 4, store_log.lines
    assert "297 more bad connections from 127.0.0.1 in the last" in store_log.lines[-1]
    assert "not a store client" in store_log.lines[-1]


def test_a_summary_comes_when_its_window_ends(store_log):
    srv = StoreServer("127.0.0.1", 0)
    srv._logbook.window = 0.5
    srv.start()
    try:
        for _ in range(10):
            garbage_handshake(srv.port)
        assert store_log.wait_for("more bad connections from 127.0.0.1")
    finally:
        srv.stop()
    full = sum(line.startswith("store: closing connection from 127.0.0.1") for line in store_log.lines)
    summed = sum(int(line.split()[1]) for line in store_log.lines if "more bad connections" in line)
    assert full + summed == 10


def test_a_stderr_nobody_drains_never_stops_the_server():
    srv = ServerProcess(fill_stderr=True)   # any write to its stderr blocks from the start
    try:
        for _ in range(20):   # each one is a warning to log
            garbage_handshake(srv.port)
        guard_is_served(srv.port)
    finally:
        srv.kill()


# -------------------------------------------------------------------------------- mutual authentication

class Impostor:
    """A program that took the store's port: it answers the handshake with `answer(hello_sock)`."""

    def __init__(self, answer):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.answer = answer
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        with sock:
            recv_frame(sock)   # the hello
            try:
                self.answer(sock)
                sock.recv(1)   # hold the connection until the client gives up on it
            except OSError:
                pass

    def close(self):
        self.listener.close()
        self.thread.join(10)


def never_asks(sock):
    sock.sendall(frame(bytes([0, 1, 1])))   # READY, version 1, features: come in


def asks_and_takes_anything(sock):
    sock.sendall(frame(bytes([1, 1]) + os.urandom(32)))   # PROOF and a challenge
    recv_frame(sock)                                       # whatever the proof, READY
    sock.sendall(frame(bytes([0]) + os.urandom(32) + bytes([1])))


@pytest.mark.parametrize("answer, says", [(never_asks, "did not ask for the token"),
                                          (asks_and_takes_anything, "did not prove it knows the token")])
def test_a_client_with_a_token_refuses_a_server_that_cannot_prove_it_knows_it(answer, says):
    impostor = Impostor(answer)
    try:
        with pytest.raises(StoreAuthError, match=says):
            TCPStore("127.0.0.1", impostor.port, token="s3cret", timeout=10)
    finally:
        impostor.close()


def test_the_real_server_proves_it_and_still_lets_in_a_client_that_does_not_ask():
    srv = StoreServer("127.0.0.1", 0, token="s3cret", local_socket=False).start()
    try:
        with TCPStore("127.0.0.1", srv.port, token="s3cret", timeout=10) as c:
            c.set("k", "v")
        # a client from before mutual authentication: its proof alone, no nonce, and no server proof back
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        try:
            sock.sendall(frame(b"EKVS\x01"))
            welcome = recv_frame(sock)
            sock.sendall(frame(store._proof(b"s3cret", welcome[2:])))
            verdict = recv_frame(sock)
            assert verdict == bytes([0, store._FEATURES])   # READY and its features, no proof
        finally:
            sock.close()
    finally:
        srv.stop()


# -------------------------------------------------------------------------------- binding one address

def test_a_master_can_listen_on_one_address_only():
    with TCPStore("127.0.0.1", 0, is_master=True, bind="127.0.0.1", timeout=10) as master:
        master.set("k", "v")
        with pytest.raises(ConnectionRefusedError):   # another address of this host
            socket.create_connection(("127.0.0.2", master.port), timeout=10).close()
    with TCPStore("127.0.0.1", 0, is_master=True, timeout=10) as everywhere:   # the default: all of them
        socket.create_connection(("127.0.0.2", everywhere.port), timeout=10).close()


# -------------------------------------------------------------------------------- numbers at the edges

def test_numbers_the_wire_cannot_carry_give_one_line_errors_or_mean_forever():
    import datetime
    import math
    srv = StoreServer("127.0.0.1", 0).start()
    try:
        with TCPStore("127.0.0.1", srv.port, timeout=10) as c:
            for amount in (2 ** 63, -2 ** 63 - 1):
                with pytest.raises(ValueError, match="outside the signed 64-bit range"):
                    c.add("n", amount)
            assert c.add("n", 2 ** 63 - 1) == 2 ** 63 - 1
            for bad in (math.nan, -1, datetime.timedelta(seconds=-1)):
                with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0"):
                    c.set_timeout(bad)
                with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0"):
                    c.wait(["n"], bad)
            with pytest.raises(TypeError, match="a timeout is a number of seconds"):
                c.set_timeout("soon")
            assert c.timeout == 10
            # a timeout beyond what the wire or the kernel can carry waits for good
            for forever in (math.inf, datetime.timedelta.max, 1e12, 10 ** 400):
                with TCPStore("127.0.0.1", srv.port, timeout=forever) as patient:
                    got = []
                    waiter = threading.Thread(target=lambda: got.append(patient.get("later")))
                    waiter.start()
                    patient.wait(["n"], forever)
                    c.set("later", "now")
                    waiter.join(30)
                    assert got == [b"now"]
                    c.delete_key("later")
    finally:
        srv.stop()


def test_parked_queue_pops_count_against_the_same_caps_and_large_values_are_owed():
    srv = StoreServer("127.0.0.1", 0, max_parked_per_connection=20).start()
    sock = raw_connect(srv.port)
    try:
        sock.sendall(b"".join(request(14, rid, struct.pack(">q", -1) + field(b"q")) for rid in range(25)))
        refused = read_replies(sock, 5)
        assert sorted(refused) == list(range(20, 25))
        assert all(status == 2 and b"max_parked_per_connection" in body for status, body in refused.values())
        with TCPStore("127.0.0.1", srv.port, timeout=10) as c:
            for i in range(20):   # 20 MiB handed to a client that reads none of it yet
                c.queue_push("q", bytes([i]) * MiB)
            c.set("pushed", "1")
        replies = read_replies(sock, 20)
        assert sorted(body[4:5] for status, body in replies.values()) == [bytes([i]) for i in range(20)]
        assert all(status == 0 and len(body) == 4 + MiB for status, body in replies.values())
        assert srv._parked == 0
    finally:
        sock.close()
        srv.stop()
