"""store.py: every operation with torch's semantics, the wire protocol's defences, limits, the CLI.

Servers are real (in a thread of this process or a separate process), clients use real sockets on
127.0.0.1. Raw-socket tests encode frames by hand from the protocol in store.py's docstring, so they
check the documented protocol rather than the client's idea of it.
"""
import datetime
import gc
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import store
from store import (PrefixStore, QueueEmptyError, StoreAuthError, StoreConnectionError, StoreError,
                   StoreServer, StoreTimeout, TCPStore)

from conftest import ROOT


@pytest.fixture(params=["same-host", "tcp"])
def server(request):
    """A server in this process; its clients move to the same-host socket, or (tcp) stay on TCP."""
    srv = StoreServer("127.0.0.1", 0, local_socket=request.param == "same-host").start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client(server):
    c = TCPStore("127.0.0.1", server.port, timeout=10)
    try:
        yield c
    finally:
        c.close()


class Narration(logging.Handler):
    """Keeps the store logger's lines with the monotonic time each came."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append((time.monotonic(), record.getMessage()))

    def retrying(self):
        return [(when, line) for when, line in self.lines if "retrying" in line]


@pytest.fixture
def narration():
    handler = Narration()
    store.log.addHandler(handler)
    try:
        yield handler
    finally:
        store.log.removeHandler(handler)


def wait_until(condition, what, guard=30.0):
    """Wait for a server-side state the test can't be told of otherwise; `guard` only catches hangs."""
    deadline = time.monotonic() + guard
    while not condition():
        assert time.monotonic() < deadline, "never happened: " + what
        time.sleep(0.01)


def closed_port():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


# -------------------------------------------------------------------------------- raw protocol helpers

def frame(payload):
    return struct.pack(">I", len(payload)) + payload


def field(data):
    return struct.pack(">I", len(data)) + data


def request(op, rid, args=b""):
    return frame(struct.pack(">BI", op, rid) + args)


def recv_exactly(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("closed after %d of %d bytes" % (len(data), size))
        data += chunk
    return data


def recv_frame(sock):
    (length,) = struct.unpack(">I", recv_exactly(sock, 4))
    return recv_exactly(sock, length)


def raw_connect(port, version=1, timeout=10):
    """A handshaken raw socket (no token)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(frame(b"EKVS" + bytes([version])))
    welcome = recv_frame(sock)
    assert welcome[0] == 0, welcome
    return sock


def closed_by_peer(sock, timeout=10):
    """True when the server closes `sock` (reads until EOF or reset)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


# -------------------------------------------------------------------------------- operations

def test_set_get_str_and_bytes(client):
    client.set("a", "text")
    client.set("b", b"\x00\xffbinary")
    assert client.get("a") == b"text"
    assert client.get("b") == b"\x00\xffbinary"
    client.set("a", "")
    assert client.get("a") == b""


def test_get_waits_for_a_later_set(server, client):
    other = TCPStore("127.0.0.1", server.port, timeout=10)
    try:
        got = []
        t = threading.Thread(target=lambda: got.append(client.get("late")))
        t.start()
        assert not client.check(["late"])
        other.set("late", "here")
        t.join(10)
        assert got == [b"here"]
    finally:
        other.close()


def test_add_counts_from_zero_and_accepts_negatives(client):
    assert client.add("n", 1) == 1
    assert client.add("n", 41) == 42
    assert client.add("n", -50) == -8
    assert client.get("n") == b"-8"
    assert client.add("zero", 0) == 0
    client.set("preset", "10")
    assert client.add("preset", 5) == 15


def test_add_on_a_non_number_raises_and_keeps_the_connection(client):
    client.set("word", "hello")
    with pytest.raises(StoreError, match="not an integer"):
        client.add("word", 1)
    assert client.get("word") == b"hello"
    assert client.add("fine", 2) == 2


def test_compare_set_follows_torch(client):
    # missing key, empty expected: sets desired
    assert client.compare_set("k", "", "first") == b"first"
    assert client.get("k") == b"first"
    # matching expected: swaps
    assert client.compare_set("k", "first", "second") == b"second"
    # mismatching expected: returns the current value, changes nothing
    assert client.compare_set("k", "nope", "third") == b"second"
    assert client.get("k") == b"second"
    # missing key, non-empty expected: returns expected, sets nothing
    assert client.compare_set("absent", "exp", "des") == b"exp"
    assert not client.check(["absent"])


def test_wait_check_delete_num_keys(client):
    assert client.num_keys() == 0
    client.multi_set(["x", "y"], ["1", b"2"])
    client.wait(["x", "y"], timeout=1)
    assert client.check(["x", "y"])
    assert not client.check(["x", "z"])
    assert client.num_keys() == 2
    assert client.delete_key("x") is True
    assert client.delete_key("x") is False
    assert client.num_keys() == 1
    assert client.multi_get(["y"]) == [b"2"]


def test_multi_get_append(client):
    client.multi_set(["p", "q", "r"], ["1", "22", ""])
    assert client.multi_get(["r", "p", "q"]) == [b"", b"1", b"22"]
    client.append("log", "ab")
    client.append("log", b"cd")
    assert client.get("log") == b"abcd"
    with pytest.raises(ValueError, match="2 keys and 1 values"):
        client.multi_set(["a", "b"], ["1"])


def test_get_timeout_names_the_key_and_leaves_the_client_usable(client):
    client.set_timeout(0.2)
    with pytest.raises(StoreTimeout, match="keys: /never ") as info:
        client.get("never")
    assert isinstance(info.value, TimeoutError)
    with pytest.raises(StoreTimeout, match="keys: /k1, /k2 "):
        client.wait(["k1", "k2"], timeout=0.1)
    client.set_timeout(10)
    client.set("after", "ok")
    assert client.get("after") == b"ok"


def test_a_long_get_waits_on_the_socket_longer_than_the_server_does(server):
    """The server answers a get that runs out of time with a TIMEOUT naming the keys. The client's
    own receive timeout must run out later, also when the store timeout is within 10% of what the
    get needs (timeouts of 45 s and more, the default 300 s among them): were the socket's timeout
    left at the store timeout, the client would give up first and report a silent store instead
    of the missing key.
    Waiting a minute here would be slow; the kernel's SO_RCVTIMEO on the socket tells the same."""
    def receive_timeout(c):
        sec, usec = store._TIMEVAL.unpack(c._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                                             store._TIMEVAL.size))
        return sec + usec / 1e6

    with TCPStore("127.0.0.1", server.port, timeout=60) as c:
        c.set("k", "v")
        assert receive_timeout(c) >= 60
        assert c.get("k") == b"v"
        assert receive_timeout(c) >= 66
        c.wait(["k"], timeout=300)
        assert receive_timeout(c) >= 330
        assert c.add("n", 1) == 1   # back to about the store timeout, never below it
        assert 60 <= receive_timeout(c) <= 66


def test_wait_with_zero_timeout_answers_at_once(client):
    with pytest.raises(StoreTimeout):
        client.wait(["nothing"], timeout=0)
    client.set("something", "1")
    client.wait(["something"], timeout=0)


def test_wait_survives_a_delete_of_a_key_it_already_saw(server, client):
    """A waiter on two keys whose first key is deleted before the second appears keeps waiting."""
    other = TCPStore("127.0.0.1", server.port, timeout=10)
    try:
        client.set("one", "1")
        done = threading.Event()
        errors = []

        def waiter():
            try:
                other.wait(["one", "two"], timeout=10)
            except Exception as e:  # reported below
                errors.append(e)
            done.set()

        t = threading.Thread(target=waiter)
        t.start()
        client.delete_key("one")
        client.set("two", "2")
        assert not done.wait(0.3)
        client.set("one", "again")
        assert done.wait(10) and not errors
        t.join()
    finally:
        other.close()


def test_types_are_checked(client):
    with pytest.raises(TypeError):
        client.set(1, "v")
    with pytest.raises(TypeError):
        client.set("k", 1.5)
    with pytest.raises(TypeError):
        client.add("k", 1.5)
    with pytest.raises(TypeError):
        client.wait("single-string")
    with pytest.raises(ValueError):
        client.set_timeout(-1)


def test_prefix_store(client):
    view = PrefixStore("run1", client)
    view.set("a", "1")
    assert client.get("run1/a") == b"1"
    assert view.add("n", 3) == 3
    assert view.compare_set("a", "1", "2") == b"2"
    assert view.check(["a", "n"])
    view.multi_set(["m"], ["v"])
    assert view.multi_get(["a", "m"]) == [b"2", b"v"]
    view.append("m", "w")
    assert view.get("m") == b"vw"
    assert view.delete_key("m")
    nested = PrefixStore("inner", view)
    nested.set("z", "deep")
    assert client.get("run1/inner/z") == b"deep"
    view.close()  # a view owns nothing
    assert client.get("run1/a") == b"2"


def test_is_master_hosts_the_server_and_port_zero_picks_one():
    with TCPStore("127.0.0.1", 0, is_master=True, timeout=10) as master:
        assert master.port > 0 and master.server is not None
        with TCPStore("127.0.0.1", master.port, timeout=10) as c:
            c.set("from", "client")
            assert master.get("from") == b"client"
    with pytest.raises(StoreConnectionError):
        TCPStore("127.0.0.1", master.port, timeout=0.3)


def test_a_master_dropped_without_close_stops_its_server_and_frees_the_port():
    s = TCPStore("127.0.0.1", 0, is_master=True, timeout=5)
    port, server = s.port, s.server
    del s
    gc.collect()
    assert server._stopped.is_set()
    TCPStore("127.0.0.1", port, is_master=True, timeout=5).close()   # as torch's master allows


def test_one_client_shared_by_many_threads(client):
    def work(i):
        for _ in range(200):
            client.add("shared", 1)
        client.set("t%d" % i, str(i))
        assert client.get("t%d" % i) == str(i).encode()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert client.get("shared") == b"1600"


def test_threads_mixing_quick_and_parked_requests_each_get_their_own_reply(client):
    # a thread alone on the socket takes the quick path; with a parked wait in flight the others
    # share the socket, so a reply handed to the wrong thread shows up as a repeated count or value
    counts, errors = [], []

    def work(i):
        try:
            for j in range(150):
                counts.append(client.add("ctr", 1))
                client.set("k%d" % i, "%d-%d" % (i, j))
                assert client.get("k%d" % i) == b"%d-%d" % (i, j)
                if j % 25 == 0:
                    with pytest.raises(StoreTimeout):
                        client.wait(["never"], timeout=0.05)
        except BaseException as e:  # reported below: an assert in a thread would go unseen
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(counts) == list(range(1, 8 * 150 + 1))


@pytest.fixture
def program():
    """The store program on a port of its choosing, as (process, port); killed after the test,
    stopped or not."""
    proc = _start_program("--host", "127.0.0.1", "--port", "0")
    try:
        yield proc, int(proc.stdout.readline().rsplit(":", 1)[1])
    finally:
        proc.kill()
        proc.wait()


def test_a_late_reply_from_a_stalled_server_is_not_taken_for_the_next_one(program):
    proc, port = program
    with TCPStore("127.0.0.1", port, timeout=1) as c:
        assert c.add("n", 1) == 1
        proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreTimeout, match="no answer"):
                c.add("n", 10)
            assert time.monotonic() - t0 < 5
        finally:
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.5)   # the answer to the abandoned add (11) is now waiting on the socket
        assert c.add("n", 100) == 111
        assert c.get("n") == b"111"


def _interrupt_inside(name):
    """Start a thread that sends this (main) thread SIGINT once it calls the C function `name`;
    returns the profile function that notices the call."""
    calling = threading.Event()

    def profile(frame, event, arg):
        if event == "c_call" and getattr(arg, "__name__", None) == name:
            sys.setprofile(None)
            calling.set()

    def interrupt():
        if calling.wait(30):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    return profile


def test_a_set_interrupted_while_sending_closes_the_client_rather_than_corrupt_the_value(program):
    proc, port = program
    size = 32 * 1024 * 1024   # more than the socket buffers hold: sendall waits for the server
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    with TCPStore("127.0.0.1", port, timeout=10) as c, TCPStore("127.0.0.1", port, timeout=10) as other:
        proc.send_signal(signal.SIGSTOP)
        os.waitpid(proc.pid, os.WUNTRACED)
        try:
            sys.setprofile(_interrupt_inside("sendall"))
            with pytest.raises(KeyboardInterrupt):
                c.set("big", b"A" * size)
        finally:
            sys.setprofile(None)
            signal.signal(signal.SIGINT, previous)
            proc.send_signal(signal.SIGCONT)
        # the next request's bytes must not complete the interrupted frame and be stored as its value
        with pytest.raises(StoreConnectionError, match="interrupted \\(KeyboardInterrupt\\) while being sent"):
            c.set("victim", b"V" * size)
        assert not other.check(["big"]) and not other.check(["victim"])


def _interrupt_at(n):
    """A profile function that raises KeyboardInterrupt at the n-th call, return, C call or C return
    this thread makes outside the test: where a real Ctrl-C can land, one point at a time."""
    seen = [0]

    def profile(frame, event, arg):
        if frame.f_code.co_filename == __file__:   # the test's own calls
            return
        if event == "c_call" and getattr(arg, "__name__", None) == "__exit__":
            return   # a with-statement's exit: Python handles no signal between its block and this call
        seen[0] += 1
        if seen[0] == n:
            sys.setprofile(None)
            raise KeyboardInterrupt
    return profile, seen


def test_a_request_from_inside_a_request_of_the_same_thread_is_refused_at_once(client):
    # as from a signal handler that runs while its thread is in the middle of a request; the send
    # lock can't be a plain Lock (whose owner an interrupted request could not tell), and the RLock
    # must not let the inner request write into the outer one's frame
    inner = []

    def profile(frame, event, arg):
        if event == "c_call" and getattr(arg, "__name__", None) == "sendall":
            sys.setprofile(None)
            try:
                client.set("inner", "x")
            except StoreError as e:
                inner.append(e)

    try:
        sys.setprofile(profile)
        client.set("outer", "y")
    finally:
        sys.setprofile(None)
    assert "previous request is unfinished" in str(inner[0])
    assert client.get("outer") == b"y" and not client.check(["inner"])


def _parked_get(c, key, out):
    """Start a thread whose get of `key` is parked, the thread reading the socket for everyone."""
    def get():
        try:
            out.append(c.get(key))
        except StoreError as e:
            out.append(e)
    t = threading.Thread(target=get)
    t.start()
    while not c._reading and not out:
        time.sleep(0.001)   # the get is sent once it holds the reading: no event to wait on
    return t


@pytest.mark.parametrize("path", ["exchange", "alone", "shared"])
def test_an_interrupt_anywhere_in_a_request_leaves_the_client_usable_or_closed_never_wedged(server, path):
    """exchange: a set alone on the socket; alone: a get that reads for itself; shared: an add
    beside another thread's parked get, which reads and hands the add its reply."""
    other = TCPStore("127.0.0.1", server.port, timeout=10)
    other.set("k", "v")
    c, closed, n = None, 0, 0
    try:
        while True:
            n += 1
            if c is None:
                c = TCPStore("127.0.0.1", server.port, timeout=5)
            parked, got = None, []
            if path == "shared":
                parked = _parked_get(c, "gate%d" % n, got)
            profile, seen = _interrupt_at(n)
            try:
                sys.setprofile(profile)
                if path == "exchange":
                    c.set("k", "v")
                elif path == "alone":
                    assert c.get("k") == b"v"
                else:
                    assert c.add("n", 0) == 0
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
            done = seen[0] < n   # the request ran to its end without reaching the n-th point
            t0 = time.monotonic()
            try:   # the next request: served, or refused at once because the connection was closed
                assert c.add("n", 0) == 0
                assert c.get("k") == b"v"
                usable = True
            except StoreConnectionError as e:
                assert "was closed because a request was interrupted (KeyboardInterrupt)" in str(e)
                usable = False
            assert time.monotonic() - t0 < 2, "wedged after an interrupt at point %d" % n
            if parked is not None:
                other.set("gate%d" % n, "open")
                parked.join(5)
                assert not parked.is_alive()
                assert got == [b"open"] if usable else (got == [b"open"] or isinstance(got[0], StoreConnectionError))
            if not usable:
                closed += 1
                c.close()
                c = None
            if done:
                break
        print("%s: interrupted at %d points, %d of them closed the client" % (path, n - 1, closed))
        assert n > 20 and other.get("k") == b"v"
    finally:
        if c is not None:
            c.close()
        other.close()


def test_a_request_stuck_on_a_stalled_server_holds_other_threads_no_longer_than_they_wait(program):
    # an add keeps the socket to itself for its round trip; a thread that comes meanwhile with a
    # shorter wait must give up in its own time, not in the add's
    proc, port = program
    with TCPStore("127.0.0.1", port, timeout=60) as c:
        assert c.add("n", 1) == 1
        proc.send_signal(signal.SIGSTOP)
        added, waited = [], []
        try:
            adder = threading.Thread(target=lambda: added.append(c.add("n", 1)))
            adder.start()
            time.sleep(0.2)   # the add is out and unanswered
            t0 = time.monotonic()
            with pytest.raises(StoreTimeout):
                c.wait(["never"], timeout=0.1)   # its patience: 0.1 s, then 5 s for the server
            waited.append(time.monotonic() - t0)
        finally:
            proc.send_signal(signal.SIGCONT)
        adder.join(10)
        assert added == [2]
        assert waited[0] < 10
        assert c.add("n", 1) == 3


def test_a_wait_of_centuries_beside_another_threads_parked_get(client):
    # the shared path waits on thread locks, whose timeouts overflow past about 292 years
    got = []
    parked = threading.Thread(target=lambda: got.append(client.get("gate")))
    parked.start()
    time.sleep(0.2)
    opener = threading.Timer(0.3, lambda: client.set("later", "x"))
    opener.start()
    try:
        client.wait(["later"], timeout=datetime.timedelta(days=150000))   # 410 years
    finally:
        opener.join()
        client.set("gate", "open")
        parked.join(10)
    assert got == [b"open"]


def test_a_blocked_get_and_other_threads_share_one_socket(server, client):
    got = []
    t = threading.Thread(target=lambda: got.append(client.get("gate")))
    t.start()
    for i in range(50):  # replies to these come while the get above is parked
        assert client.add("busy", 1) == i + 1
    client.set("gate", "open")
    t.join(10)
    assert got == [b"open"]


def test_large_values_round_trip(client):
    value = os.urandom(8 * 1024 * 1024)
    client.set("big", value)
    assert client.get("big") == value


def test_connect_retries_until_the_server_appears():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    result = []
    t = threading.Thread(target=lambda: result.append(TCPStore("127.0.0.1", port, timeout=20)))
    t.start()
    time.sleep(0.3)  # the point of the test: the client starts first and must keep retrying
    srv = StoreServer("127.0.0.1", port).start()
    try:
        t.join(20)
        assert result, "client never connected"
        result[0].set("k", "v")
        assert result[0].get("k") == b"v"
        result[0].close()
    finally:
        srv.stop()


def test_connect_gives_up_with_a_clear_error():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(StoreConnectionError, match=r"^The client socket has timed out after 300ms while trying "
                       r"to connect to \(127.0.0.1, %d\): Connection refused" % port):
        TCPStore("127.0.0.1", port, timeout=0.3)


def test_a_refused_connect_is_narrated_at_a_human_pace_until_the_server_appears(narration):
    """Issue 17: a store that refuses connections used to be silent until the join timeout."""
    port = closed_port()
    result = []
    start = time.monotonic()
    t = threading.Thread(target=lambda: result.append(TCPStore("127.0.0.1", port, timeout=60)))
    t.start()
    srv = None
    try:
        wait_until(lambda: any("127.0.0.1:%d " % port in line for _, line in narration.lines),
                   "something said about the wait")
        time.sleep(max(0.0, start + 3.5 - time.monotonic()))   # the scenario: the server comes 3.5 s late
        srv = StoreServer("127.0.0.1", port).start()
        t.join(30)
        end = time.monotonic()
        assert result, "client never connected"
        result[0].set("k", "v")
        assert result[0].get("k") == b"v"
    finally:
        if result:
            result[0].close()
        if srv is not None:
            srv.stop()
    lines = [(when, line) for when, line in narration.retrying() if "127.0.0.1:%d " % port in line]
    assert lines, narration.lines
    first_at, first = lines[0]
    left = int(first.rsplit(", ", 1)[1].split()[0])
    assert first == "store 127.0.0.1:%d refuses connections (retrying, %d s left)" % (port, left)
    assert 50 <= left <= 59
    assert first_at - start >= 1.0          # not at the first refusal: only a wait of seconds is told
    times = [start] + [when for when, _ in lines]
    assert all(b - a >= 1.0 for a, b in zip(times, times[1:])), lines   # never two lines within a second
    assert len(lines) <= end - start, lines


def test_the_pace_of_narration_first_after_2_s_then_backing_off_to_10_s():
    now = [100.0]
    pace = store._Pace(clock=lambda: now[0])
    said = []
    while now[0] < 160.0:
        if pace.due():
            said.append(now[0] - 100.0)
        now[0] += 0.25   # a retry loop's turn
    assert said == [2.0, 6.0, 14.0, 24.0, 34.0, 44.0, 54.0]


def test_a_host_name_that_does_not_resolve_is_retried_until_the_timeout(narration, monkeypatch):
    """torch retries a name that does not resolve (pods and late DNS records appear after the job
    starts); we used to give up at once. One lookup per attempt, never a tight loop of them."""
    lookups = []
    real = socket.getaddrinfo

    def counted(host, *args, **kwargs):
        lookups.append(host)
        if host == "nonexistent.invalid":   # the answer a resolver gives, at once: here a lookup that
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")   # stalls past the
        return real(host, *args, **kwargs)   # whole timeout would leave no time to narrate

    monkeypatch.setattr(socket, "getaddrinfo", counted)
    with pytest.raises(StoreConnectionError) as info:
        TCPStore("nonexistent.invalid", 29400, timeout=6)   # retries sleep up to 1.5 s: one lands past 2 s
    message = str(info.value)
    assert message.startswith("The client socket has timed out after 6000ms while trying to connect to "
                              "(nonexistent.invalid, 29400): the host name 'nonexistent.invalid' "
                              "does not resolve ("), message
    assert isinstance(info.value, RuntimeError)
    lines = [line for _, line in narration.retrying() if "nonexistent.invalid" in line]
    assert lines and lines[0].startswith("store host nonexistent.invalid does not resolve yet (retrying, "), lines
    ours = [host for host in lookups if host == "nonexistent.invalid"]   # other threads may look up too
    assert 2 <= len(ours) <= 25, lookups   # retried, about 4 lookups a second at most


def test_server_going_away_fails_a_blocked_get_instead_of_hanging():
    srv = StoreServer("127.0.0.1", 0).start()
    c = TCPStore("127.0.0.1", srv.port, timeout=30)
    try:
        errors = []

        def blocked():
            try:
                c.get("never")
            except Exception as e:
                errors.append(e)

        t = threading.Thread(target=blocked)
        t.start()
        srv.stop()
        t.join(15)
        assert not t.is_alive()
        assert isinstance(errors[0], StoreConnectionError)
        with pytest.raises(StoreConnectionError):
            c.set("k", "v")
    finally:
        c.close()
        srv.stop()


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_stop_closes_a_server_that_never_served():
    before = _open_fds()
    srv = StoreServer("127.0.0.1", 0)
    srv.stop()
    assert _open_fds() == before   # listener, poller, wake-up pair, spare descriptor
    StoreServer("127.0.0.1", srv.port).stop()   # the port is free again
    srv.serve_forever()                          # returns at once: it was stopped


class _LateServer(StoreServer):
    """A server whose thread begins serving only once stop() wakes it: the moment stop() missed."""

    def __init__(self, *args):
        super().__init__(*args)
        self.woken = threading.Event()
        wake, woken = self._wake_w, self.woken

        class Wake:
            def send(self, data):
                woken.set()
                return wake.send(data)

            def close(self):
                wake.close()

        self._wake_w = Wake()

    def serve_forever(self):
        self.woken.wait(10)
        super().serve_forever()


def test_stop_right_after_start_returns_with_the_port_closed():
    srv = _LateServer("127.0.0.1", 0).start()
    srv.stop()
    assert srv._listener.fileno() == -1
    StoreServer("127.0.0.1", srv.port).stop()   # the port is free again


def test_every_later_error_tells_why_the_connection_ended(program):
    proc, port = program
    c = TCPStore("127.0.0.1", port, timeout=10)
    try:
        c.set("a", "1")
        proc.kill()
        proc.wait()
        for _ in range(3):   # the server went away: no call blames a close() nobody made
            with pytest.raises(StoreConnectionError, match="lost the store at 127.0.0.1:%d: it closed" % port):
                c.set("a", "2")
    finally:
        c.close()
    with pytest.raises(StoreConnectionError, match="lost the store"):
        c.set("a", "3")


def test_a_blocked_get_is_told_its_client_was_closed(server):
    c = TCPStore("127.0.0.1", server.port, timeout=10)
    errors = []

    def blocked(key):
        try:
            c.get(key)
        except StoreError as e:
            errors.append(e)

    threads = [threading.Thread(target=blocked, args=("never%d" % i,)) for i in range(2)]
    for t in threads:   # one reads the socket, the other sleeps until its reply is handed over
        t.start()
    while len(c._waiting) < 1 or not c._reading:
        time.sleep(0.01)   # both parked: nothing to wait on from outside the client
    c.close()
    for t in threads:
        t.join(5)
    assert len(errors) == 2
    for e in errors:
        assert isinstance(e, StoreConnectionError)
        assert str(e) == "this client of the store at 127.0.0.1:%d was closed" % server.port
    with pytest.raises(StoreConnectionError, match="was closed"):
        c.set("k", "v")


# -------------------------------------------------------------------------------- torch's other API

def test_store_errors_are_runtime_errors_as_torchs_are(client):
    """torch's store errors are RuntimeErrors and scripts say `except RuntimeError`; ours keep their
    builtin bases too."""
    for cls in (StoreError, StoreTimeout, StoreConnectionError, StoreAuthError, QueueEmptyError):
        assert issubclass(cls, RuntimeError)
    assert issubclass(StoreTimeout, TimeoutError) and issubclass(StoreConnectionError, ConnectionError)
    client.set_timeout(0.1)
    try:
        client.get("missing")
    except RuntimeError as e:
        assert isinstance(e, StoreTimeout)
    else:
        pytest.fail("no timeout")


def test_timeouts_read_like_torchs(client):
    """torch's tests and users' scripts match "timeout" in the message (torch: `wait timeout after
    100ms, keys: /the_key`)."""
    with pytest.raises(RuntimeError, match="^wait timeout after 100ms, keys: /the_key "):
        client.wait(["the_key"], datetime.timedelta(milliseconds=100))
    client.set_timeout(datetime.timedelta(milliseconds=250))
    with pytest.raises(StoreTimeout, match="^wait timeout after 250ms, keys: /a b, /c "):
        client.multi_get(["a b", "c"])
    with pytest.raises(StoreTimeout, match="^wait timeout after 0ms, keys: /x "):
        client.wait(["x"], 0)


def test_prefix_store_refuses_a_missing_store():
    with pytest.raises(ValueError, match="store argument cannot be None"):
        PrefixStore("p", None)
    with pytest.raises(TypeError, match="prefix must be a str"):
        PrefixStore(None, object())


def test_queue_push_pop_len_keep_order_and_a_non_blocking_pop_says_empty(client):
    client.queue_push("q", "a")
    client.queue_push("q", b"\x00b")
    assert (client.queue_len("q"), client.queue_len("never-pushed")) == (2, 0)
    assert client.queue_pop("q") == b"a"
    assert client.queue_pop("q", block=False) == b"\x00b"
    assert client.queue_len("q") == 0
    with pytest.raises(QueueEmptyError, match="^queue is empty: q ") as info:
        client.queue_pop("q", False)
    assert isinstance(info.value, RuntimeError)
    client.queue_push("q", "")
    assert client.queue_pop("q", block=False) == b""   # an empty value is a value


def test_a_blocking_pop_waits_for_a_push_or_times_out_like_a_wait(server, client):
    client.set_timeout(0.3)
    with pytest.raises(StoreTimeout, match="^wait timeout after 300ms, keys: /q "):
        client.queue_pop("q")
    with pytest.raises(StoreTimeout, match="^wait timeout after 100ms, keys: /q "):
        client.queue_pop("q", timeout=0.1)
    client.set_timeout(30)
    got = []
    t = threading.Thread(target=lambda: got.append(client.queue_pop("q")))
    t.start()
    try:
        wait_until(lambda: b"q" in server._poppers, "the pop parked")
        with TCPStore("127.0.0.1", server.port, timeout=10) as other:
            other.queue_push("q", "late")
            assert other.queue_len("q") == 0   # handed to the parked pop, not queued
    finally:
        t.join(30)
    assert got == [b"late"]


def test_each_value_goes_to_exactly_one_pop_the_longest_waiting_first(server):
    poppers = [TCPStore("127.0.0.1", server.port, timeout=30) for _ in range(4)]
    got = {}
    threads = [threading.Thread(target=lambda i=i, c=c: got.__setitem__(i, c.queue_pop("jobs")))
               for i, c in enumerate(poppers)]
    try:
        for i, t in enumerate(threads):   # one at a time, so the order they wait in is known
            t.start()
            wait_until(lambda: len(server._poppers.get(b"jobs", ())) == i + 1, "pop %d parked" % i)
        with TCPStore("127.0.0.1", server.port, timeout=10) as pusher:
            for n in range(6):
                pusher.queue_push("jobs", str(n))
            for t in threads:
                t.join(30)
            assert got == {0: b"0", 1: b"1", 2: b"2", 3: b"3"}
            assert pusher.queue_len("jobs") == 2
            assert [pusher.queue_pop("jobs"), pusher.queue_pop("jobs")] == [b"4", b"5"]
    finally:
        for c in poppers:
            c.close()


def test_a_pop_that_gave_up_or_whose_client_left_takes_nothing(server, client):
    with pytest.raises(StoreTimeout):
        client.queue_pop("q", timeout=0.05)
    leaving = TCPStore("127.0.0.1", server.port, timeout=30)
    errors = []

    def pop():
        try:
            leaving.queue_pop("q")
        except StoreConnectionError as e:
            errors.append(e)

    t = threading.Thread(target=pop)
    t.start()
    try:
        wait_until(lambda: b"q" in server._poppers, "the pop parked")
        leaving.close()
        t.join(30)
        wait_until(lambda: b"q" not in server._poppers, "the server dropped the closed client's pop")
    finally:
        leaving.close()
        t.join(30)
    assert errors
    client.queue_push("q", "kept")
    assert client.queue_len("q") == 1
    assert client.queue_pop("q") == b"kept"


def test_queues_live_beside_keys_and_count_for_check_and_wait_as_in_torch(client):
    client.queue_push("q", "item")
    assert client.check(["q"])
    client.wait(["q"], timeout=5)
    assert client.num_keys() == 0
    assert not client.delete_key("q") and client.queue_len("q") == 1
    with pytest.raises(StoreTimeout):
        client.wait(["q", "other"], timeout=0.05)
    client.set_timeout(0.1)
    with pytest.raises(StoreTimeout):
        client.get("q")                    # get reads values, never a queue
    client.set("q", "value")
    assert client.queue_pop("q") == b"item" and client.get("q") == b"value"
    assert client.delete_key("q") and not client.check(["q"])


def test_a_push_answers_a_parked_wait_but_not_a_parked_get(server, client):
    results = {}
    with TCPStore("127.0.0.1", server.port, timeout=30) as waiter, \
            TCPStore("127.0.0.1", server.port, timeout=30) as getter:
        def wait():
            waiter.wait(["w", "w"], timeout=30)
            results["wait"] = "answered"

        def get():
            results["get"] = getter.get("w")

        threads = [threading.Thread(target=wait), threading.Thread(target=get)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: len(server._waiters.get(b"w", ())) == 2, "the wait and the get parked")
            client.queue_push("w", "x")
            threads[0].join(30)
            assert results == {"wait": "answered"}
            assert len(server._waiters.get(b"w", ())) == 1   # the get still waits for a value
            client.set("w", "value")
        finally:
            for t in threads:
                t.join(30)
    assert results == {"wait": "answered", "get": b"value"}
    assert client.queue_len("w") == 1


def test_queue_ops_on_the_wire(server):
    """QPUSH 13, QPOP 14, QLEN 15 and LIST 16 as the module docstring gives them."""
    sock = raw_connect(server.port)
    try:
        sock.sendall(request(14, 1, struct.pack(">q", -1) + field(b"q"))    # parks: the queue is empty
                     + request(15, 2, field(b"q"))
                     + request(13, 3, field(b"q") + field(b"v1"))
                     + request(13, 4, field(b"q") + field(b"v2"))
                     + request(15, 5, field(b"q"))
                     + request(14, 6, struct.pack(">q", 0) + field(b"q"))
                     + request(14, 7, struct.pack(">q", 0) + field(b"q"))
                     + request(1, 8, field(b"key") + field(b"v"))
                     + request(16, 9))
        replies = {}
        for _ in range(9):
            reply = recv_frame(sock)
            status, rid = struct.unpack_from(">BI", reply)
            replies[rid] = (status, reply[5:])
        assert replies == {1: (0, field(b"v1")), 2: (0, struct.pack(">q", 0)), 3: (0, b""), 4: (0, b""),
                           5: (0, struct.pack(">q", 1)), 6: (0, field(b"v2")), 7: (1, b""), 8: (0, b""),
                           9: (0, struct.pack(">I", 1) + field(b"key"))}
    finally:
        sock.close()


def test_clone_is_another_connection_to_the_same_store(server):
    with TCPStore("127.0.0.1", server.port, timeout=7) as c:
        assert c.has_extended_api()
        twin = c.clone()
        try:
            assert twin._sock is not c._sock and twin.timeout == 7 and twin.server is None
            twin.set("k", "v")
            assert c.get("k") == b"v"
        finally:
            twin.close()
        c.set("still", "here")   # closing the clone leaves the original alone
        assert c.get("still") == b"here"


def test_a_clone_of_the_master_carries_its_token_and_leaves_the_server_to_it():
    master = TCPStore("127.0.0.1", 0, is_master=True, token="s3cret", timeout=10)
    try:
        twin = master.clone()
        twin.set("from-clone", "1")
        twin.close()
        assert master.get("from-clone") == b"1"
    finally:
        master.close()


def test_prefix_store_passes_queues_clone_and_extended_api_through(client):
    view = PrefixStore("pre", client)
    view.queue_push("q", "a")
    assert client.queue_len("pre/q") == 1 and view.queue_len("q") == 1
    assert view.queue_pop("q", block=False) == b"a"
    with pytest.raises(QueueEmptyError):
        view.queue_pop("q", False)
    assert view.has_extended_api()
    assert not PrefixStore("p", object()).has_extended_api()
    twin = view.clone()
    try:
        assert isinstance(twin, PrefixStore) and twin.prefix == "pre"
        assert twin.underlying_store is not client
        twin.set("x", "1")
        assert client.get("pre/x") == b"1"
    finally:
        twin.close()
    with pytest.raises(StoreConnectionError, match="was closed"):   # a clone owns its connection
        twin.get("x")
    view.close()
    assert view.get("x") == b"1"                                    # a plain view owns nothing


def test_list_keys_names_the_keys_not_the_queues(client):
    client.multi_set(["a", "b/c"], ["1", "2"])
    client.queue_push("q", "x")
    assert sorted(client.list_keys()) == ["a", "b/c"]
    assert PrefixStore("b", client).list_keys() == ["c"]
    client.delete_key("a")
    assert client.list_keys() == ["b/c"]


def test_barrier_returns_once_world_size_callers_came(server):
    clients = [TCPStore("127.0.0.1", server.port, timeout=30) for _ in range(3)]
    passed = []
    threads = [threading.Thread(target=lambda c=c: (c.barrier("gate", 3), passed.append(c))) for c in clients[:2]]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: len(server._waiters.get(b"gate/last_member", ())) == 2, "two callers waiting")
        assert passed == []
        clients[2].barrier("gate", 3)
        for t in threads:
            t.join(30)
        assert len(passed) == 2
        with pytest.raises(StoreTimeout, match="^barrier timeout after 50ms, key: other "):
            clients[0].barrier("other", 2, datetime.timedelta(milliseconds=50))
        with pytest.raises(ValueError, match="world_size"):
            clients[0].barrier("bad", 0)
    finally:
        for c in clients:
            c.close()


# -------------------------------------------------------------------------------- scale

def test_a_thousand_parked_waiters_released_by_one_set(server):
    """1,024 connections each park a GET; one SET answers all of them."""
    n = 1024
    socks = []
    try:
        for i in range(n):
            s = raw_connect(server.port)
            # GET gate (parks), then CHECK gate: the CHECK's answer arriving first proves the GET was
            # read and parked, not answered
            s.sendall(request(2, i, struct.pack(">q", -1) + struct.pack(">I", 1) + field(b"gate"))
                      + request(6, 100000 + i, struct.pack(">I", 1) + field(b"gate")))
            socks.append(s)
        for i, s in enumerate(socks):
            reply = recv_frame(s)
            assert struct.unpack_from(">BI", reply) == (0, 100000 + i) and reply[5:] == b"\x00"
        with TCPStore("127.0.0.1", server.port, timeout=10) as c:
            c.set("gate", "go")
        answered = 0
        for s in socks:
            s.setblocking(True)
            s.settimeout(20)
            reply = recv_frame(s)
            status, rid = struct.unpack_from(">BI", reply)
            assert status == 0 and reply[5:] == field(b"go")
            answered += 1
        assert answered == n
    finally:
        for s in socks:
            s.close()


def test_connection_limit_turns_clients_away_with_a_clear_error():
    srv = StoreServer("127.0.0.1", 0, max_connections=3).start()
    clients = []
    try:
        for _ in range(3):
            clients.append(TCPStore("127.0.0.1", srv.port, timeout=5))
        with pytest.raises(StoreConnectionError, match="connection limit"):
            TCPStore("127.0.0.1", srv.port, timeout=5)
        clients.pop().close()
        for c in clients:
            c.set("still", "served")
        deadline = time.monotonic() + 10
        while True:  # the server notices the closed connection on its next turn
            try:
                late = TCPStore("127.0.0.1", srv.port, timeout=5)
                break
            except StoreConnectionError:
                assert time.monotonic() < deadline
                clients[0].check(["still"])
        clients.append(late)
        assert late.get("still") == b"served"
    finally:
        for c in clients:
            c.close()
        srv.stop()


# -------------------------------------------------------------------------------- ephemeral keys

def test_an_ephemeral_key_vanishes_when_its_clients_connection_closes(server, client):
    owner = TCPStore("127.0.0.1", server.port, timeout=10)
    try:
        assert owner.supports_ephemeral
        owner.set_ephemeral("alive", "1")
        owner.set_ephemeral("alive", "2")          # rewriting keeps it ephemeral
        owner.set_ephemeral("kept", "1")
        client.set("kept", "mine now")             # an ordinary write makes it lasting
        owner.set_ephemeral("deleted", "1")
        assert client.delete_key("deleted")
        client.set("deleted", "later")             # a new key of that name is not the owner's
        assert client.get("alive") == b"2"
    finally:
        owner.close()
    client.wait(["kept"])
    deadline = time.monotonic() + 10
    while client.check(["alive"]):                 # the server sees the close on its next turn
        assert time.monotonic() < deadline, "the ephemeral key outlived its client"
        time.sleep(0.01)
    assert client.get("kept") == b"mine now"
    assert client.get("deleted") == b"later"


def test_an_ephemeral_key_vanishes_when_its_client_process_is_killed(server, client):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import store\n"
            "s = store.TCPStore('127.0.0.1', int(sys.argv[2]), timeout=10)\n"
            "s.set_ephemeral('alive', 'x'); s.set('ready', '1'); sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, ROOT, str(server.port)], stdin=subprocess.PIPE)
    try:
        client.wait(["ready"], 30)
        assert client.get("alive") == b"x"
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while client.check(["alive"]):
            assert time.monotonic() < deadline, "the killed client's ephemeral key is still there"
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_another_connections_ephemeral_write_takes_the_key_over(server, client):
    first = TCPStore("127.0.0.1", server.port, timeout=10)
    try:
        first.set_ephemeral("k", "first")
        first.set_ephemeral("marker", "1")
        client.set_ephemeral("k", "second")
    finally:
        first.close()
    deadline = time.monotonic() + 10
    while client.check(["marker"]):   # gone: the server has handled the close
        assert time.monotonic() < deadline, "the closed client's marker key is still there"
        time.sleep(0.01)
    assert client.get("k") == b"second"


def test_wait_gone_wakes_when_a_killed_clients_ephemeral_key_vanishes(server, client):
    """GONE: parked until one of its keys is deleted (by DELETE, or by the close of the
    connection that set it ephemeral), with nothing polling; at once when one is missing."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import store\n"
            "s = store.TCPStore('127.0.0.1', int(sys.argv[2]), timeout=10)\n"
            "s.set_ephemeral('alive', 'x'); s.set('ready', '1'); sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, ROOT, str(server.port)], stdin=subprocess.PIPE)
    try:
        assert client.supports_gone
        client.wait_gone(["alive", "never-set"], 0)          # one is missing: answered at once
        client.wait(["ready"], 30)
        client.set("stays", "1")
        with pytest.raises(StoreTimeout):
            client.wait_gone(["alive", "stays"], 0.05)
        woke = []
        waiter = TCPStore("127.0.0.1", server.port, timeout=10)
        t = threading.Thread(target=lambda: woke.append(waiter.wait_gone(["stays", "alive"], 60) or "woke"))
        t.start()
        proc.kill()
        t.join(60)
        waiter.close()
        assert woke == ["woke"] and not client.check(["alive"])
        client.set("doomed", "1")
        t = threading.Thread(target=lambda: woke.append(client.wait_gone(["doomed"], 60) or "deleted"))
        t.start()
        time.sleep(0.05)       # usually parked by now; answered the same way if it was not
        client.delete_key("doomed")
        t.join(60)
        assert woke == ["woke", "deleted"]
        assert client.get("stays") == b"1"                   # the client is still usable
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_beat_sets_its_key_and_answers_with_values_or_at_a_deletion(server, client):
    """BEAT: set the key ephemeral, then park as GONE; at the timeout the watched values come back."""
    other = TCPStore("127.0.0.1", server.port, timeout=10)
    try:
        assert client.supports_beat
        other.set("peer", "7")
        assert client.beat("mine", "1", ["mine", "peer"], 0.05) == [b"1", b"7"]
        assert other.get("mine") == b"1"
        assert client.beat("mine", "2", ["missing"], 5) is None        # one is gone already
        woke = []
        t = threading.Thread(target=lambda: woke.append(client.beat("mine", "3", ["mine", "peer"], 60)))
        t.start()
        other.wait(["mine"])
        while other.get("mine") != b"3":
            time.sleep(0.01)
        other.delete_key("peer")
        t.join(60)
        assert woke == [None]
    finally:
        other.close()
    client.close()
    deadline = time.monotonic() + 10
    with TCPStore("127.0.0.1", server.port, timeout=10) as probe:
        while probe.check(["mine"]):                 # the beaten key is ephemeral
            assert time.monotonic() < deadline, "the beaten key outlived its client"
            time.sleep(0.01)


def test_ephemeral_and_queues_on_a_server_without_them_are_refused_clearly():
    """A server older than EPHEMERAL sends no features byte; the client refuses without sending
    the op (which such a server would answer by closing the connection)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    seen = []

    def old_server():
        conn, _ = lst.accept()
        with conn:
            recv_frame(conn)
            conn.sendall(frame(bytes([0, 1])))      # READY, version 1, and nothing else
            conn.settimeout(5)
            try:
                while True:
                    seen.append(recv_frame(conn))
            except (EOFError, OSError):
                pass

    t = threading.Thread(target=old_server)
    t.start()
    try:
        with TCPStore("127.0.0.1", lst.getsockname()[1], timeout=5) as c:
            assert not c.supports_ephemeral
            with pytest.raises(StoreError, match="does not know set_ephemeral"):
                c.set_ephemeral("k", "v")
            for op in (lambda: c.queue_push("q", "v"), lambda: c.queue_pop("q"), lambda: c.queue_len("q")):
                with pytest.raises(StoreError, match="does not know queues: it runs an older store.py"):
                    op()
            with pytest.raises(StoreError, match="does not know list_keys"):
                c.list_keys()
    finally:
        t.join(10)
        lst.close()
    assert seen == []


def test_welcome_and_verdict_carry_the_features_byte():
    srv = StoreServer("127.0.0.1", 0, local_socket=False).start()
    tsrv = StoreServer("127.0.0.1", 0, token="s3cret").start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(frame(b"EKVS\x01"))
            welcome = recv_frame(sock)
            assert welcome[:2] == bytes([0, 1]) and len(welcome) == 3   # READY, version 1, features
            assert welcome[2] & 0x79 == 0x79 and not welcome[2] & 2   # EPHEMERAL, queues, LIST, GONE, BEAT; no offer
            sock.sendall(request(11, 7, field(b"e") + field(b"v")))
            assert recv_frame(sock) == struct.pack(">BI", 0, 7)
        with TCPStore("127.0.0.1", tsrv.port, token="s3cret", timeout=5) as c:
            assert c.supports_ephemeral                  # the verdict carried the features
            assert c._sock.family == socket.AF_UNIX      # and the offer of the same-host socket
    finally:
        srv.stop()
        tsrv.stop()


def same_host_offer(sock):
    """Hello on a raw TCP socket; returns the offered (name, ticket) of the same-host socket."""
    sock.sendall(frame(b"EKVS\x01"))
    welcome = recv_frame(sock)
    assert welcome[:2] == bytes([0, 1]) and welcome[2] & (1 | 2) == 1 | 2, welcome   # READY, version, EPHEMERAL | offer
    size = welcome[3]
    name, ticket = welcome[4:4 + size], welcome[4 + size:]
    assert name.startswith(b"\0") and len(ticket) == 16
    return name, ticket


def redeem(name, hello):
    """Connect to the same-host socket and say `hello`; returns (socket, answer or None if closed)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(name)
    sock.sendall(frame(hello))
    try:
        return sock, recv_frame(sock)
    except (EOFError, ConnectionResetError):
        return sock, None


def test_a_client_on_this_host_moves_to_the_same_host_socket():
    srv = StoreServer("127.0.0.1", 0).start()
    tcp_only = StoreServer("127.0.0.1", 0, local_socket=False).start()
    try:
        with TCPStore("127.0.0.1", srv.port, timeout=5) as c, \
                TCPStore("127.0.0.1", srv.port, timeout=5) as d:
            assert c._sock.family == d._sock.family == socket.AF_UNIX
            assert srv._conns == 2      # their TCP connections were closed when they moved
            c.set("k", "v")
            assert d.get("k") == b"v" and d.add("n", 2) == 2
        with TCPStore("127.0.0.1", tcp_only.port, timeout=5) as c:
            assert c._sock.family == socket.AF_INET
            assert c.add("n", 1) == 1
    finally:
        srv.stop()
        tcp_only.stop()


def test_the_same_host_socket_lets_in_only_a_live_ticket_and_only_once():
    srv = StoreServer("127.0.0.1", 0).start()
    opened = []
    try:
        with TCPStore("127.0.0.1", srv.port, timeout=5) as bystander:
            bystander.set("mine", "intact")
            tcp = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            opened.append(tcp)
            name, ticket = same_host_offer(tcp)
            for hello in (b"EKVL\x01" + bytes(16), b"EKVL\x01" + ticket[::-1]):   # wrong tickets
                sock, answer = redeem(name, hello)
                opened.append(sock)
                assert answer == bytes([4, 1]) and closed_by_peer(sock)   # REFUSED
            sock, answer = redeem(name, b"EKVS\x01")    # a plain hello: no way around the ticket
            opened.append(sock)
            assert answer is None
            sock, answer = redeem(name, b"EKVL\x01" + ticket)
            opened.append(sock)
            assert answer[:2] == bytes([0, 1]) and answer[2] & 1   # READY, version, features: EPHEMERAL
            assert closed_by_peer(tcp)                   # the TCP connection it came from is closed
            sock.sendall(request(1, 5, field(b"k") + field(b"v")))
            assert recv_frame(sock) == struct.pack(">BI", 0, 5)
            again, answer = redeem(name, b"EKVL\x01" + ticket)   # used once already
            opened.append(again)
            assert answer == bytes([4, 1])
            late = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            opened.append(late)
            _, late_ticket = same_host_offer(late)
            late.close()                                 # its ticket dies with the connection
            time.sleep(0.2)
            gone, answer = redeem(name, b"EKVL\x01" + late_ticket)
            opened.append(gone)
            assert answer == bytes([4, 1])
            assert bystander.get("mine") == b"intact" and bystander.get("k") == b"v"
            assert srv._tickets == {}
    finally:
        for sock in opened:
            sock.close()
        srv.stop()


def test_a_client_that_cannot_reach_the_same_host_socket_stays_on_tcp():
    """As from another network namespace that shares the address: the offer fails, TCP carries on."""
    srv = StoreServer("127.0.0.1", 0)
    srv._local_name = b"\0elasticrun-store-nobody-listens-here"
    srv.start()
    try:
        with TCPStore("127.0.0.1", srv.port, timeout=5) as c:
            assert c._sock.family == socket.AF_INET
            c.set_ephemeral("e", "1")
            assert c.add("n", 1) == 1 and c.get("e") == b"1"
            assert len(srv._tickets) == 1               # unredeemed: held while the connection lives
        deadline = time.monotonic() + 10
        while srv._tickets and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv._tickets == {}
    finally:
        srv.stop()


# -------------------------------------------------------------------------------- protocol defences

def test_protocol_version_mismatch_is_refused_clearly(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        sock.sendall(frame(b"EKVS" + bytes([99])))
        welcome = recv_frame(sock)
        assert welcome == bytes([2, 1])  # VERSION, and the server's own version
        assert closed_by_peer(sock)
    finally:
        sock.close()


def test_client_reports_a_server_of_another_version():
    """A listener answering VERSION (as a server of protocol 7 would) gives a clear client error."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)

    def answer():
        conn, _ = lst.accept()
        recv_frame(conn)
        conn.sendall(frame(bytes([2, 7])))
        conn.close()

    t = threading.Thread(target=answer)
    t.start()
    try:
        with pytest.raises(StoreConnectionError, match="protocol version 7; this client speaks 1"):
            TCPStore("127.0.0.1", lst.getsockname()[1], timeout=5)
    finally:
        t.join(5)
        lst.close()


@pytest.mark.parametrize("junk", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",        # not a store client
    frame(b"EKVS\x01") + request(99, 1),          # unknown op
    frame(b"EKVS\x01") + request(1, 1, b"\x00"),  # truncated key length
    frame(b"EKVS\x01") + request(1, 1, field(b"k")),                     # missing value
    frame(b"EKVS\x01") + request(1, 1, field(b"k") + field(b"v") + b"x"),  # trailing byte
    frame(b"EKVS\x01") + request(2, 1, struct.pack(">q", -1) + struct.pack(">I", 10 ** 9)),  # lying count
    frame(b"EKVS\x01") + struct.pack(">I", 2 ** 31),   # oversized frame
    struct.pack(">I", 10000),                           # oversized hello
    frame(b"EKVS\x01") + frame(b"\x01"),                # request shorter than its header
])
def test_malformed_input_closes_only_that_connection(server, client, junk):
    client.set("precious", "data")
    bad = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        bad.sendall(junk)
        assert closed_by_peer(bad)
    finally:
        bad.close()
    assert client.get("precious") == b"data"
    assert not client.check(["k"])
    assert client.num_keys() == 1


def _valid_requests():
    key = st.binary(min_size=0, max_size=12)
    value = st.binary(max_size=40)
    keys = st.lists(key, min_size=1, max_size=3)
    wait_ms = st.integers(min_value=0, max_value=5)
    return st.one_of(
        st.builds(lambda k, v: request(1, 1, field(k) + field(v)), key, value),
        st.builds(lambda t, ks: request(2, 2, struct.pack(">qI", t, len(ks)) + b"".join(map(field, ks))),
                  wait_ms, keys),
        st.builds(lambda k, d: request(3, 3, field(k) + struct.pack(">q", d)), key,
                  st.integers(-2 ** 63, 2 ** 63 - 1)),
        st.builds(lambda k, e, d: request(4, 4, field(k) + field(e) + field(d)), key, value, value),
        st.builds(lambda ks: request(6, 6, struct.pack(">I", len(ks)) + b"".join(map(field, ks))), keys),
        st.builds(lambda k: request(7, 7, field(k)), key),
        st.just(request(8, 8)),
        st.builds(lambda k, v: request(10, 10, field(k) + field(v)), key, value),
    )


def _mutate(data, flips, cut, extra):
    data = bytearray(data)
    for pos, byte in flips:
        if data:
            data[pos % len(data)] = byte
    if cut is not None and data:
        del data[cut % len(data):]
    return bytes(data) + extra


_mutated = st.builds(_mutate, _valid_requests(),
                     st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), max_size=3),
                     st.one_of(st.none(), st.integers(0, 10 ** 6)), st.binary(max_size=8))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(handshake=st.booleans(), chunks=st.lists(st.one_of(st.binary(max_size=64), _valid_requests(), _mutated),
                                                  min_size=1, max_size=6))
def test_fuzzed_frames_never_corrupt_other_clients_data(fuzz_target, handshake, chunks):
    srv, guard = fuzz_target
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    try:
        if handshake:
            sock.sendall(frame(b"EKVS\x01"))
            recv_frame(sock)
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break  # the server closed us: that's its right
    finally:
        sock.close()
    # the guard's keys live under a prefix no fuzzed key can reach (fuzzed keys are at most 12 bytes)
    assert guard.multi_get(["guarded/precious-key-0", "guarded/precious-key-1"]) == [b"zero", b"one"]
    assert guard.add("guarded/precious-counter", 1) > 0


@pytest.fixture(scope="module")
def fuzz_target():
    srv = StoreServer("127.0.0.1", 0).start()
    guard = TCPStore("127.0.0.1", srv.port, timeout=10)
    guard.multi_set(["guarded/precious-key-0", "guarded/precious-key-1"], ["zero", "one"])
    try:
        yield srv, guard
    finally:
        guard.close()
        srv.stop()


def test_keys_and_frames_over_the_limits_are_refused(server, client):
    with pytest.raises(ValueError, match="exceeds the limit"):
        client.set("k" * (store.MAX_KEY_SIZE + 1), "v")
    client.set("k" * store.MAX_KEY_SIZE, "v")  # exactly at the limit is fine
    # a key field claiming more than MAX_KEY_SIZE inside a well-formed frame closes the connection
    sock = raw_connect(server.port)
    try:
        big = b"k" * (store.MAX_KEY_SIZE + 1)
        sock.sendall(request(1, 1, field(big) + field(b"v")))
        assert closed_by_peer(sock)
    finally:
        sock.close()
    assert client.num_keys() == 1


def test_requests_and_replies_over_the_frame_limit_fail_clearly_and_keep_the_connection(client):
    half = b"x" * (store.MAX_FRAME_SIZE // 2 + 1)   # each value is legal, two are not one frame
    assert len(half) <= store.MAX_VALUE_SIZE
    with pytest.raises(ValueError, match="over the frame limit of %d bytes" % store.MAX_FRAME_SIZE):
        client.multi_set(["a", "b"], [half, half])
    with pytest.raises(ValueError, match="over the frame limit"):
        client.compare_set("a", half, half)
    assert client.num_keys() == 0
    client.set("a", half)
    client.set("b", half)
    with pytest.raises(StoreError, match="over the frame limit of %d bytes" % store.MAX_FRAME_SIZE):
        client.multi_get(["a", "b"])
    assert client.num_keys() == 2
    assert client.multi_get(["a"]) == [half]


def test_pipelined_raw_requests_are_answered_by_id(server):
    sock = raw_connect(server.port)
    try:
        sock.sendall(request(2, 7, struct.pack(">qI", -1, 1) + field(b"later"))
                     + request(3, 8, field(b"n") + struct.pack(">q", 5))
                     + request(1, 9, field(b"later") + field(b"now")))
        replies = {}
        for _ in range(3):
            reply = recv_frame(sock)
            status, rid = struct.unpack_from(">BI", reply)
            replies[rid] = (status, reply[5:])
        assert replies[8] == (0, struct.pack(">q", 5))
        assert replies[9] == (0, b"")
        assert replies[7] == (0, field(b"now"))
    finally:
        sock.close()


# -------------------------------------------------------------------------------- authentication

def test_token_accepted_and_refused():
    srv = StoreServer("127.0.0.1", 0, token="s3cret").start()
    try:
        with TCPStore("127.0.0.1", srv.port, token="s3cret", timeout=5) as good:
            good.set("k", "v")
            with pytest.raises(StoreAuthError, match="refused our token"):
                TCPStore("127.0.0.1", srv.port, token="wrong", timeout=5)
            with pytest.raises(StoreAuthError, match="requires a token"):
                TCPStore("127.0.0.1", srv.port, timeout=5)
            assert good.get("k") == b"v"
        # a raw client that skips the proof gets nothing: a request instead of a proof is refused
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        try:
            sock.sendall(frame(b"EKVS\x01"))
            welcome = recv_frame(sock)
            assert welcome[0] == 1 and len(welcome) == 2 + 32
            sock.sendall(request(2, 1, struct.pack(">qI", 0, 1) + field(b"k")))
            assert recv_frame(sock) == bytes([4])  # REFUSED
            assert closed_by_peer(sock)
        finally:
            sock.close()
    finally:
        srv.stop()


def test_connections_that_never_finish_the_handshake_are_closed_at_its_deadline():
    srv = StoreServer("127.0.0.1", 0, token="s3cret", max_connections=2, handshake_timeout=0.5).start()
    silent = socket.create_connection(("127.0.0.1", srv.port), timeout=10)   # never says hello
    unproven = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    try:
        unproven.sendall(frame(b"EKVS\x01"))
        assert recv_frame(unproven)[0] == 1   # PROOF: then it never proves anything
        assert closed_by_peer(silent) and closed_by_peer(unproven)
        with TCPStore("127.0.0.1", srv.port, token="s3cret", timeout=5) as c:   # not locked out
            c.set("k", "v")
            assert c.get("k") == b"v"
    finally:
        silent.close()
        unproven.close()
        srv.stop()


# -------------------------------------------------------------------------------- the program

def _start_program(*args):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "store.py")] + list(args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc


def test_program_serves_and_stops_on_sigterm(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("abc\n")
    proc = _start_program("--host", "127.0.0.1", "--port", "0", "--token-file", str(token_file))
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        with TCPStore("127.0.0.1", port, token="abc", timeout=10) as c:
            assert c.add("n", 2) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_program_rejects_bad_arguments_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("")
    for args, needle in ((["--token-file", str(empty)], "is empty"),
                         (["--token-file", str(tmp_path / "missing")], "No such file"),
                         (["--port", "notaport"], "--port")):
        proc = _start_program("--host", "127.0.0.1", *args)
        try:
            out, err = proc.communicate(timeout=20)
        finally:
            proc.kill()
        assert proc.returncode == 2, err
        assert needle in err and len(err.strip().splitlines()[-1]) < 200


def test_ports_out_of_range_are_refused_clearly():
    for port in ("70000", "-1"):
        proc = _start_program("--host", "127.0.0.1", "--port", port)
        try:
            out, err = proc.communicate(timeout=20)
        finally:
            proc.kill()
        assert proc.returncode == 2, err
        assert err.strip().splitlines() == ["store.py: error: --port must be from 0 to 65535, got %s" % port]
    for make in (lambda: StoreServer("127.0.0.1", 70000), lambda: StoreServer("127.0.0.1", -1),
                 lambda: TCPStore("127.0.0.1", 70000, is_master=True),
                 lambda: TCPStore("127.0.0.1", 70000, timeout=0.3)):   # would dial 70000 % 65536
        with pytest.raises(ValueError, match="port must be between 0 and 65535"):
            make()


# -------------------------------------------------------------------------------- against torch

TORCH_SEMANTICS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import store
from datetime import timedelta
import torch.distributed as dist

def run(s, mine):
    out = []
    def rec(f):
        try:
            v = f()
            out.append(v.decode("latin-1") if isinstance(v, bytes) else v)
        except Exception as e:
            out.append("error")
    rec(lambda: s.set("a", "1"))
    rec(lambda: s.get("a"))
    rec(lambda: s.add("a", 5))
    rec(lambda: s.add("fresh", -3))
    rec(lambda: s.compare_set("c", "", "x"))
    rec(lambda: s.compare_set("c", "x", "y"))
    rec(lambda: s.compare_set("c", "z", "w"))
    rec(lambda: s.compare_set("missing", "e", "d"))
    rec(lambda: s.check(["missing"]))
    rec(lambda: s.check(["a", "c"]))
    rec(lambda: s.set("b", b"\x00\x01"))
    rec(lambda: s.get("b"))
    rec(lambda: s.append("b", "zz"))
    rec(lambda: s.get("b"))
    rec(lambda: s.multi_set(["m1", "m2"], ["v1", "v2"]))
    rec(lambda: s.multi_get(["m2", "m1"]))
    rec(lambda: s.delete_key("m1"))
    rec(lambda: s.delete_key("m1"))
    rec(lambda: s.set("word", "hi"))
    rec(lambda: s.add("word", 1))
    rec(lambda: s.get("word"))
    return [x if not isinstance(x, list) else [y.decode("latin-1") for y in x] for x in out]

theirs = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10), use_libuv=True)
mine = store.TCPStore("127.0.0.1", 0, is_master=True, timeout=10)
print(json.dumps({"torch": run(theirs, False), "ours": run(mine, True)}))
"""


def test_operations_match_torchs_tcpstore(torch_python):
    out = subprocess.run([torch_python, "-c", TORCH_SEMANTICS, ROOT], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    import json
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # torch's client breaks after a failed add (its next call errors too); ours stays usable
    assert result["torch"][:20] == result["ours"][:20]
    assert result["ours"][19] == "error"
    assert result["ours"][20] == "hi"


def test_a_wait_of_centuries_and_a_key_named_twice(server, client):
    """Found by the fuzzer: a huge timeout_ms once overflowed the server's poll and stopped it."""
    sock = raw_connect(server.port)
    try:
        sock.sendall(request(2, 1, struct.pack(">qI", 2 ** 62, 2) + field(b"twice") + field(b"twice")))
        client.set("other", "x")      # the server took another turn after parking the century-long get
        assert client.get("other") == b"x"
        client.set("twice", "here")   # one set answers a get that names its key twice
        reply = recv_frame(sock)
        assert struct.unpack_from(">BI", reply) == (0, 1) and reply[5:] == field(b"here") * 2
    finally:
        sock.close()


TORCH_QUEUES_AND_ERRORS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import store
from datetime import timedelta
import torch.distributed as dist

def run(s, prefix_store):
    out = []
    def rec(f):
        try:
            v = f()
            out.append(v.decode("latin-1") if isinstance(v, bytes) else v)
        except Exception as e:
            # the class name for queue errors, and whether the error is a RuntimeError saying "timeout"
            out.append([type(e).__name__ if "Queue" in type(e).__name__ else "error",
                        isinstance(e, RuntimeError), "timeout" in str(e)])
    base = s.num_keys()
    rec(lambda: s.queue_push("q", "a"))
    rec(lambda: s.queue_push("q", b"\x00b"))
    rec(lambda: s.queue_len("q"))
    rec(lambda: s.queue_len("never"))
    rec(lambda: s.check(["q"]))
    rec(lambda: s.wait(["q"], timedelta(seconds=5)))
    rec(lambda: s.num_keys() - base)
    rec(lambda: s.delete_key("q"))
    rec(lambda: s.queue_pop("q"))
    rec(lambda: s.queue_pop("q", block=False))
    rec(lambda: s.check(["q"]))
    rec(lambda: s.queue_pop("q", False))
    rec(lambda: s.set_timeout(timedelta(milliseconds=200)))
    rec(lambda: s.queue_pop("q"))
    rec(lambda: s.wait(["the_key"], timedelta(milliseconds=100)))
    rec(lambda: s.get("missing"))
    rec(lambda: s.has_extended_api())
    rec(lambda: prefix_store("p", None))
    view = prefix_store("p", s)
    rec(lambda: view.queue_push("pq", "z"))
    rec(lambda: s.queue_len("p/pq"))
    rec(lambda: view.queue_pop("pq"))
    rec(lambda: view.has_extended_api())
    twin = s.clone()
    rec(lambda: twin.set("cloned", "1"))
    rec(lambda: s.get("cloned"))
    view.set("pk", "1")
    rec(lambda: sorted(s.list_keys()))
    rec(lambda: view.list_keys())
    rec(lambda: s.barrier("bar", 1))   # (the keys a barrier counts in differ: see TCPStore.barrier)
    rec(lambda: view.barrier("bar", 1, timedelta(seconds=5)))
    rec(lambda: s.barrier("bar2", 2, timedelta(milliseconds=100)))
    return out

theirs = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10), use_libuv=True)
mine = store.TCPStore("127.0.0.1", 0, is_master=True, timeout=10)
print(json.dumps({"torch": run(theirs, dist.PrefixStore), "ours": run(mine, store.PrefixStore)}))
"""


def test_queues_errors_and_clone_match_torchs_tcpstore(torch_python):
    """The same calls on torch's TCPStore and ours give the same results and the same kinds of error.
    (The wire protocols differ, so this compares behaviour, not bytes.)"""
    out = subprocess.run([torch_python, "-c", TORCH_QUEUES_AND_ERRORS, ROOT], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    import json
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ours"] == result["torch"]


# torch's TCPStore signature (issue 16): what the ported torch cases do not pin

def test_multi_tenant_masters_share_one_server_until_the_last_closes():
    a = TCPStore("127.0.0.1", 0, 1, True, multi_tenant=True)   # port 0: the port the first tenant got
    port = a.port
    b = TCPStore("127.0.0.1", port, 1, True, multi_tenant=True)
    others = []
    try:
        assert a.server is b.server
        a.set("k", "v")
        assert b.get("k") == b"v"
        assert b.num_keys() == 2   # "k" and the one world-size key both masters counted in
        assert b.list_keys() == ["k"]   # which no caller can name, as in torch
        with pytest.raises(StoreConnectionError, match="^The server socket has failed to listen"):
            others.append(TCPStore("127.0.0.1", port, 1, True))   # not a tenant: the port is taken
        a.close()
        assert b.get("k") == b"v"   # the other tenant's server goes on
        b.close()
        c = TCPStore("127.0.0.1", port, is_master=True, timeout=5)   # the last close freed the port
        others.append(c)
        assert c.num_keys() == 0
    finally:
        for s in [a, b] + others:
            s.close()


def test_a_master_waits_for_world_size_stores_and_the_last_one_wakes_it():
    master_done, errors, made = threading.Event(), [], []

    def master():
        try:
            made.append(TCPStore("127.0.0.1", port, 2, True, timeout=30))
        except BaseException as e:   # surfaced below
            errors.append(e)
        master_done.set()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    thread = threading.Thread(target=master)
    thread.start()
    client = None
    try:
        wait_until(lambda: _serves(port), "the master's server")
        assert not master_done.is_set()
        client = TCPStore("127.0.0.1", port, world_size=2, timeout=30)
        assert master_done.wait(30) and not errors, errors
        assert client.num_keys() == 1 and client.list_keys() == []
        assert not client.check(["init/"])   # torch's key is out of every caller's reach
    finally:
        thread.join(30)
        for s in made + [client]:
            if s is not None:
                s.close()


def _serves(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_without_world_size_or_with_wait_for_workers_false_nothing_is_counted():
    with TCPStore("127.0.0.1", 0, is_master=True) as m, TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False) as n:
        TCPStore("127.0.0.1", m.port, 3, False, wait_for_workers=False).close()
        assert m.num_keys() == 0 and n.num_keys() == 0   # torch: the same


def test_world_size_must_be_a_positive_int():
    with pytest.raises(ValueError, match="TCPStore world size cannot be -1"):
        TCPStore("127.0.0.1", 0, -1, True)
    with pytest.raises(TypeError, match="world size"):
        TCPStore("127.0.0.1", 0, "2", True)


def test_torchs_keyword_names_and_our_keywords_both_work(server):
    with TCPStore(host_name="127.0.0.1", port=server.port, timeout=datetime.timedelta(seconds=5),
                  use_libuv=False) as s:
        s.set("k", "v")
    with pytest.raises(TypeError, match="host or host_name"):
        TCPStore("127.0.0.1", server.port, host_name="127.0.0.1")


@pytest.mark.parametrize("value", ["False", "0", ""])
def test_the_launchers_agent_store_false_keeps_a_master_serving(monkeypatch, value):
    """elasticrun gives workers TORCHELASTIC_USE_AGENT_STORE=False: a worker's master store serves."""
    with TCPStore("127.0.0.1", 0, is_master=True) as taken:
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", value)
        monkeypatch.setenv("MASTER_PORT", str(taken.port))
        with pytest.raises(StoreConnectionError, match="failed to listen"):
            TCPStore("127.0.0.1", taken.port, 1, True)
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
        with TCPStore("127.0.0.1", taken.port, 1, True) as worker:
            assert worker.server is None and worker.port == taken.port


def test_a_master_takes_over_a_listening_socket_and_closes_it():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    fd = listener.detach()
    with TCPStore("127.0.0.1", port, is_master=True, master_listen_fd=fd, timeout=5) as s:
        s.set("k", "v")
        assert s.get("k") == b"v"
    wait_until(lambda: not _serves(port), "the taken-over socket to close")


class _DictStore:
    """A user's own store with only the basic methods (no append, multi_get, multi_set)."""

    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value

    def get(self, key):
        return self.data[key]

    def check(self, keys):
        return all(k in self.data for k in keys)

    def compare_set(self, key, expected, desired):
        if self.data.get(key, b"") == expected:
            self.data[key] = desired
        return self.data[key]


def test_prefix_append_falls_back_even_when_the_value_already_equals_the_appended_part():
    """torch's fallback cannot tell 'created with the value' from 'already held the value' and loses
    the append; ours asks check() first when the store has it."""
    inner = _DictStore()
    view = PrefixStore("p", inner)
    view.append("k", "po")
    view.append("k", b"po")
    assert inner.data == {"p/k": b"popo"}
    view.multi_set(["a"], ["x"])
    assert view.multi_get(["a", "k"]) == [b"x", b"popo"]


TORCH_WORLD_SIZE_COUNTS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import store
import torch.distributed as dist

def run(TCPStore):
    out = []
    for ws, wait in ((None, True), (1, True), (2, False), (3, True)):
        # a master that waits is made for world size 1, so that it need not wait for the clients below
        m = TCPStore("127.0.0.1", 0, 1 if ws and wait else ws, True, wait_for_workers=wait)
        c1 = TCPStore("127.0.0.1", m.port, ws, False, wait_for_workers=wait)
        c2 = TCPStore("127.0.0.1", m.port, ws, False, wait_for_workers=not wait)
        out.append([ws, wait, m.num_keys(), m.check(["init/"]), c1.num_keys()])
    return out

print(json.dumps({"torch": run(dist.TCPStore), "ours": run(store.TCPStore)}))
"""


def test_world_size_counts_match_torchs_tcpstore(torch_python):
    """Which constructions count themselves in torch's world-size key: the same as torch's, by num_keys."""
    out = subprocess.run([torch_python, "-c", TORCH_WORLD_SIZE_COUNTS, ROOT], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    import json
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ours"] == result["torch"]


def test_a_master_waiting_for_clients_says_so_and_its_timeout_names_the_count(narration):
    with pytest.raises(StoreTimeout, match=r"^Timed out after 3 seconds waiting for clients\. 1/2 clients "
                                           r"joined\.$"):
        TCPStore("127.0.0.1", 0, 2, True, 2.5)
    lines = [line for _, line in narration.lines if "waiting for clients" in line]
    assert lines and "1/2 joined" in lines[0], narration.lines
