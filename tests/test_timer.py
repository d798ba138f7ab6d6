"""File timer (hang watchdog): torchelastic's FIFO wire format, real worker processes, real signals."""
import json
import logging
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT
from agent_scripts.harness import SCRIPTS, Launcher, clean_env, env, wait_for, write_script
from ports import free_port

import elastic as ops

MODULE = ops.__name__
HANG_GUARD = 30  # seconds; only a guard against a hung test, never an assertion about speed

WORKER = textwrap.dedent("""
    import importlib, os, sys, time
    ops = importlib.import_module(sys.argv[1])
    mode, path = sys.argv[2], sys.argv[3]
    ops.configure(ops.FileTimerClient(path))

    def say(text):
        print(text, flush=True)

    def guarded(after, body):
        with ops.expires(after=after):  # one file:line for every nesting level
            body()

    if mode == "hang":
        with ops.expires(after=60, scope="outer"):
            with ops.expires(after=0.5, scope="hang-step"):
                say("in")
                time.sleep(60)
    elif mode == "calm":
        with ops.expires(after=60, scope="calm-step"):
            say("in")
            sys.stdin.readline()
        say("out")
    elif mode == "nested":
        def inner():
            say("both")
            sys.stdin.readline()

        def outer():
            guarded(60, inner)
            say("outer only")
            sys.stdin.readline()

        guarded(60, outer)
        say("none")
        sys.stdin.readline()
    elif mode == "burst":   # ten nested scopes: ten acquires, ten releases
        def nest(n):
            if n:
                with ops.expires(after=100):
                    nest(n - 1)
        nest(10)
    elif mode == "dies":
        with ops.expires(after=60, scope="dies"):
            say("in")
            sys.stdin.readline()
            os._exit(3)
""")

TORCH_WORKER = textwrap.dedent("""
    import sys, time
    from torch.distributed.elastic.timer import FileTimerClient, configure, expires
    configure(FileTimerClient(sys.argv[1]))
    with expires(after=0.5):
        print("in", flush=True)
        time.sleep(60)
""")


@pytest.fixture
def server(tmp_path):
    srv = ops.FileTimerServer(str(tmp_path / "timer.fifo"), run_id="test")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def spawn(tmp_path):
    procs = []
    script = tmp_path / "worker.py"
    script.write_text(WORKER)

    def start(mode, fifo, python=sys.executable, path=None):
        argv = [python, str(path or script)] + ([MODULE, mode] if path is None else []) + [fifo]
        env = dict(os.environ, PYTHONPATH=ROOT)
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                             start_new_session=True)
        procs.append(p)
        return p

    try:
        yield start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for f in (p.stdin, p.stdout):
                f.close()


def read_line(proc, timeout=HANG_GUARD):
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "worker %d said nothing" % proc.pid
    return proc.stdout.readline().decode().strip()


def send(proc, text="go"):
    proc.stdin.write(text.encode() + b"\n")
    proc.stdin.flush()


def timers_of(srv, pid):
    return [t for t in srv.active_timers() if t[0] == pid]


def write_raw(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def request(pid, scope, expiration_time, sig):
    return (json.dumps({"version": 1, "pid": pid, "scope_id": scope,
                        "expiration_time": expiration_time, "signal": sig}) + "\n").encode()


def sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)


def test_hung_worker_killed_sibling_left_alone(server, spawn):
    hang = spawn("hang", server.file_path)
    calm = spawn("calm", server.file_path)
    assert read_line(hang) == "in" and read_line(calm) == "in"
    assert hang.wait(HANG_GUARD) == -signal.SIGKILL
    assert calm.poll() is None
    expired = server.pop_expired()
    assert [(pid, scope) for pid, scope, _ in expired] == [(hang.pid, "hang-step")]
    assert server._wait(lambda: not timers_of(server, hang.pid), HANG_GUARD)  # the outer scope went too
    assert [t[1] for t in timers_of(server, calm.pid)] == ["calm-step"]
    send(calm)
    assert read_line(calm) == "out"
    assert calm.wait(HANG_GUARD) == 0
    assert server.pop_expired() == []


def test_torch_client_against_our_server(server, spawn, torch_python, tmp_path):
    script = tmp_path / "torch_worker.py"
    script.write_text(TORCH_WORKER)
    worker = spawn(None, server.file_path, python=torch_python, path=script)
    assert read_line(worker, timeout=120) == "in"
    assert worker.wait(HANG_GUARD) == -signal.SIGKILL
    [(pid, scope, _)] = server.pop_expired()
    # torch's default scope is "<contextlib.py>#<line>" for every block: why its nested scopes collapse
    assert pid == worker.pid and "#" in scope


def test_handwritten_torch_line_honoured_and_self_never_killed(server):
    victim = sleeper()
    try:
        past = time.time() - 1
        # Requests that would kill the server, init, or every process of a group: all refused.
        for pid in (os.getpid(), 1, 0, -1, -os.getpgrp()):
            write_raw(server.file_path, request(pid, "evil", past, signal.SIGKILL))
        write_raw(server.file_path, request(victim.pid, "step", time.time() + 0.2, signal.SIGTERM))
        assert victim.wait(HANG_GUARD) == -signal.SIGTERM
        assert [(p, s) for p, s, _ in server.pop_expired()] == [(victim.pid, "step")]
    finally:
        victim.kill()
        victim.wait()


def test_file_timer_request_is_the_line_the_server_reads(server):
    """FileTimerRequest (torch's class, for clients of one's own): its to_json() line is honoured,
    an acquire and a release."""
    victim = sleeper()
    try:
        kept = ops.FileTimerRequest(victim.pid, "kept", time.time() + 60, signal.SIGKILL)
        write_raw(server.file_path, (kept.to_json() + "\n").encode())
        assert server._wait(lambda: [t[1] for t in timers_of(server, victim.pid)] == ["kept"], HANG_GUARD)
        write_raw(server.file_path, (ops.FileTimerRequest(victim.pid, "kept", -1).to_json() + "\n").encode())
        assert server._wait(lambda: not timers_of(server, victim.pid), HANG_GUARD)
        step = ops.FileTimerRequest(victim.pid, "step", time.time() + 0.2, signal.SIGTERM)
        write_raw(server.file_path, (step.to_json() + "\n").encode())
        assert victim.wait(HANG_GUARD) == -signal.SIGTERM
        assert [(p, s) for p, s, _ in server.pop_expired()] == [(victim.pid, "step")]
    finally:
        victim.kill()
        victim.wait()


def test_every_request_of_many_clients_is_read(server, spawn):
    """Ten processes, ten nested scopes each, all at once: every acquire and release reaches the
    server (torch's test_multiple_clients_interaction, without its run_once hook)."""
    workers = [spawn("burst", server.file_path) for _ in range(10)]
    for w in workers:
        assert w.wait(HANG_GUARD) == 0
    assert server._wait(lambda: server._request_count == 200, HANG_GUARD), server._request_count
    assert server._bad_lines == 0 and server.pop_expired() == []


def test_garbage_lines_skipped(server):
    victim = sleeper()
    try:
        for junk in (b"not json\n", b"{}\n", b"[1, 2]\n", b"\xff\xfe\n", b'{"version": 1, "pid": "x"}\n',
                     b'{"version": 2, "pid": 5, "scope_id": "s", "expiration_time": 1, "signal": 9}\n',
                     b'{"version": 1, "pid": true, "scope_id": "s", "expiration_time": 1, "signal": 9}\n',
                     b"\n\n"):
            write_raw(server.file_path, junk)
        assert server._wait(lambda: server._bad_lines == 7, HANG_GUARD) and server._request_count == 0
        write_raw(server.file_path, request(victim.pid, "after-junk", time.time(), signal.SIGTERM))
        assert victim.wait(HANG_GUARD) == -signal.SIGTERM
    finally:
        victim.kill()
        victim.wait()


def test_nested_scopes_keep_their_own_timers(server, spawn):
    w = spawn("nested", server.file_path)
    assert read_line(w) == "both"
    assert server._wait(lambda: len(timers_of(server, w.pid)) == 2, HANG_GUARD)
    send(w)
    assert read_line(w) == "outer only"
    assert server._wait(lambda: len(timers_of(server, w.pid)) == 1, HANG_GUARD)
    send(w)
    assert read_line(w) == "none"
    assert server._wait(lambda: not timers_of(server, w.pid), HANG_GUARD)
    send(w)
    assert w.wait(HANG_GUARD) == 0


def started_server(tmp_path, use_pidfd):
    """A started server that watches exits through pidfds or by polling (skips where it cannot)."""
    if use_pidfd and not hasattr(os, "pidfd_open"):
        pytest.skip("no os.pidfd_open on this Python")
    srv = ops.FileTimerServer(str(tmp_path / "timer.fifo"), max_interval=0.05, use_pidfd=use_pidfd)
    srv.start()
    return srv


@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "polling"])
def test_timers_of_dead_process_dropped(tmp_path, spawn, use_pidfd):
    srv = started_server(tmp_path, use_pidfd)
    try:
        w = spawn("dies", srv.file_path)
        assert read_line(w) == "in"
        assert srv._wait(lambda: timers_of(srv, w.pid), HANG_GUARD)
        send(w)
        assert w.wait(HANG_GUARD) == 3
        assert srv._wait(lambda: not srv.active_timers(), HANG_GUARD)
        assert srv.pop_expired() == []
    finally:
        srv.stop()


def test_only_worker_sessions_signalled(server):
    outsider = sleeper()
    try:
        server.set_worker_pids([12345678])
        write_raw(server.file_path, request(outsider.pid, "s", time.time() - 1, signal.SIGKILL))
        assert server._wait(lambda: server._request_count == 1 and not server.active_timers(), HANG_GUARD)
        assert outsider.poll() is None and server.pop_expired() == []
        server.set_worker_pids([outsider.pid])
        write_raw(server.file_path, request(outsider.pid, "s", time.time() - 1, signal.SIGKILL))
        assert outsider.wait(HANG_GUARD) == -signal.SIGKILL
    finally:
        outsider.kill()
        outsider.wait()


def test_client_without_server_fails_clearly(tmp_path):
    path = str(tmp_path / "timer.fifo")
    client = ops.FileTimerClient(path)
    with pytest.raises(BrokenPipeError, match="no FileTimerServer"):
        client.acquire("s", time.time() + 5)
    os.mkfifo(path)  # a pipe with no reader
    with pytest.raises(BrokenPipeError, match="no FileTimerServer"):
        client.release("s")
    with pytest.raises(ValueError, match="PIPE_BUF"):
        client.acquire("x" * 5000, time.time() + 5)


def test_stop_removes_pipe_and_restart_replaces_stale_one(tmp_path):
    path = str(tmp_path / "timer.fifo")
    os.mkfifo(path)  # stale pipe of an earlier run
    srv = ops.FileTimerServer(path)
    srv.start()
    try:
        ops.FileTimerClient(path).release("nothing")
    finally:
        srv.stop()
    assert not os.path.exists(path)
    srv.stop()  # idempotent
    regular = tmp_path / "file"
    regular.write_text("")
    with pytest.raises(ValueError, match="not a named pipe"):
        ops.FileTimerServer(str(regular)).start()


def test_expires_needs_a_client(monkeypatch):
    monkeypatch.setattr(ops, "_timer_client_configured", None)
    monkeypatch.delenv("TORCHELASTIC_TIMER_FILE", raising=False)
    with pytest.raises(RuntimeError, match="configure"):
        with ops.expires(after=1):
            pass
    with pytest.raises(ValueError):
        ops.expires(after=-1)


def test_release_failure_does_not_hide_the_blocks_exception(tmp_path):
    client = ops.FileTimerClient(str(tmp_path / "gone.fifo"))
    with pytest.raises(KeyError):
        with ops.expires(after=5, client=_AcquireOnly(client)):
            raise KeyError("the real error")


class _AcquireOnly:
    """Acquire succeeds (as if the server were there), release meets the vanished server."""

    def __init__(self, client):
        self.client = client

    def acquire(self, scope_id, expiration_time):
        pass

    def release(self, scope_id):
        self.client.release(scope_id)


def test_timer_path_from_environment(tmp_path):
    assert ops._file_timer_path({}, str(tmp_path)) is None
    assert ops._file_timer_path({"TORCHELASTIC_ENABLE_FILE_TIMER": "1"}, "/run/x") == "/run/x/timer.fifo"
    assert ops._file_timer_path({"TORCHELASTIC_TIMER_FILE": "/tmp/t.fifo"}, "/run/x") == "/tmp/t.fifo"


# The file timer through a real launcher (`python3 elastic.py ...`).
HANG = textwrap.dedent("""
    import os, signal, sys, time
    import elastic
    folder = sys.argv[1]
    rank, attempt = os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]

    def mark(name):
        with open(os.path.join(folder, name + ".tmp"), "w") as f:
            f.write(str(os.getpid()))
        os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))

    def wait_file(name):
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(folder, name)) and time.monotonic() < deadline:
            time.sleep(0.01)

    if attempt == "0" and rank == "0":
        # the sibling: inside a long scope of its own; only the group restart may stop it
        signal.signal(signal.SIGTERM, lambda *a: (mark("sibling-sigterm"), os._exit(0)))
        with elastic.expires(after=60, scope="calm-step"):
            mark("sibling-in")
            time.sleep(30)
        mark("sibling-out")
    elif attempt == "0":
        wait_file("sibling-in")
        with elastic.expires(after=0.5, scope="hang-step"):
            mark("hang-in")
            time.sleep(30)
        mark("hang-out")
    else:
        mark("attempt%s-rank%s" % (attempt, rank))
""")


def test_hung_worker_killed_group_restarted_sibling_left_alone(tmp_path):
    folder = tmp_path / "io"
    folder.mkdir()
    hang = write_script(tmp_path, "hang.py", HANG)
    a = Launcher(["--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--shutdown-timeout", "5",
                  "--monitor-interval", "0.05", hang, str(folder)], tmp_path,
                 environ=clean_env(TORCHELASTIC_ENABLE_FILE_TIMER=1))
    try:
        assert a.wait(HANG_GUARD) == 0, a.err()
        err = a.err()
        names = sorted(os.listdir(str(folder)))
        assert names == ["attempt1-rank0", "attempt1-rank1", "hang-in", "sibling-in", "sibling-sigterm"], names
        # the sibling was stopped by the group restart (SIGTERM), not by the watchdog; the hung worker
        # never left its scope
        assert "overran scope hang-step" in err and "sent SIGKILL" in err
        assert "overran file-timer scope hang-step" in err and "restarting the worker group (1/1)" in err
        assert "calm-step" not in err
        assert "all 2 workers succeeded" in err
    finally:
        a.stop()


class _Records(logging.Handler):
    """The elastic logger's records, kept in a list (the launcher's main() may have stopped them from
    propagating to the root logger, where caplog listens)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def lines(self, level=logging.WARNING):
        return [r.getMessage() for r in self.records if r.levelno >= level]


@pytest.fixture
def records():
    logger = logging.getLogger(MODULE)
    handler = _Records()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "polling"])
def test_out_of_range_fields_refused_once_and_other_timers_fire(tmp_path, records, use_pidfd):
    srv = started_server(tmp_path, use_pidfd)
    bystander, victim = sleeper(), sleeper()
    try:
        past = time.time() - 1
        bad = [request(2 ** 31, "big-pid", past, signal.SIGKILL),
               request(2 ** 63, "huge-pid", past, signal.SIGKILL),
               request(bystander.pid, "big-signal", past, 2 ** 31),
               request(bystander.pid, "huge-signal", past, 2 ** 63),
               request(bystander.pid, "no-such-signal", past, signal.NSIG),
               request(bystander.pid, "huge-time", 10 ** 400, signal.SIGKILL),
               b"[" * 60000 + b"\n"]  # nested past the JSON decoder's recursion limit
        for line in bad:
            write_raw(srv.file_path, line)
        assert srv._wait(lambda: srv._bad_lines == len(bad), HANG_GUARD), srv._bad_lines
        write_raw(srv.file_path, request(victim.pid, "good", past, signal.SIGTERM))
        assert victim.wait(HANG_GUARD) == -signal.SIGTERM
        assert [(p, s) for p, s, _ in srv.pop_expired()] == [(victim.pid, "good")]
        assert bystander.poll() is None and srv.active_timers() == []
        # many more passes: a bad line was logged when read, never again on each pass
        for i in range(20):
            write_raw(srv.file_path, request(os.getpid(), "noop-%d" % i, -1, 0))
        assert srv._wait(lambda: srv._request_count == 21, HANG_GUARD)
        assert srv._thread.is_alive()
        assert len(records.lines()) <= len(bad) + 1, records.lines()
    finally:
        srv.stop()
        for p in (bystander, victim):
            p.kill()
            p.wait()


def test_a_flood_of_garbage_is_summarised_not_logged_line_by_line(server, records):
    start = time.monotonic()
    for i in range(50):
        write_raw(server.file_path, b"junk %d\n" % i * 40)
    assert server._wait(lambda: server._bad_lines == 2000, HANG_GUARD)
    elapsed = time.monotonic() - start
    warned = [line for line in records.lines() if "malformed" in line]
    # a short burst in full, then one summary, per interval
    assert len(warned) <= (ops._LOG_BURST + 1) * (1 + int(elapsed / ops._LOG_SUMMARY_INTERVAL)), warned
    server.stop()
    summarised = [int(line.split()[2]) for line in records.lines() if " more bad requests " in line]
    assert summarised and len(warned) + sum(summarised) == 2000, records.lines()  # every one counted


def test_second_server_on_a_live_pipe_refused_first_keeps_serving(tmp_path):
    path = str(tmp_path / "timer.fifo")
    first = ops.FileTimerServer(path)
    first.start()
    try:
        inode = os.stat(path).st_ino
        second = ops.FileTimerServer(path)
        with pytest.raises(ops.ElasticError) as info:
            second.start()
        assert path in str(info.value) and "another" in str(info.value)
        assert os.stat(path).st_ino == inode  # the first server's pipe is still there
        ops.FileTimerClient(path).acquire("still-served", time.time() + 60)
        assert first._wait(lambda: first._request_count == 1, HANG_GUARD)
        second.stop()  # a server that never started removes nothing
        assert os.stat(path).st_ino == inode
    finally:
        first.stop()
    again = ops.FileTimerServer(path)  # the first one left: the path is free again
    again.start()
    again.stop()


def test_stale_pipe_of_a_killed_server_is_reused(tmp_path):
    path = str(tmp_path / "timer.fifo")
    code = ("import sys, time; sys.path.insert(0, %r); import elastic; s = elastic.FileTimerServer(%r); "
            "s.start(); print('up', flush=True); time.sleep(60)" % (ROOT, path))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert read_line(p) == "up"
        with pytest.raises(ops.ElasticError, match="another"):
            ops.FileTimerServer(path).start()
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    assert os.path.exists(path)  # SIGKILL left its pipe behind
    srv = ops.FileTimerServer(path)
    srv.start()
    try:
        ops.FileTimerClient(path).release("x")
        assert srv._wait(lambda: srv._request_count == 1, HANG_GUARD)
    finally:
        srv.stop()


def test_a_foreign_reader_on_the_pipe_is_refused_too(tmp_path):
    """A server that takes no lock (torch's own, an older launcher) is found by its open read end."""
    path = str(tmp_path / "timer.fifo")
    os.mkfifo(path, 0o600)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(ops.ElasticError, match="another"):
            ops.FileTimerServer(path).start()
        assert os.path.exists(path)
    finally:
        os.close(reader)


def test_non_workers_refused_while_workers_start_and_after(server, records):
    worker, outsider = sleeper(), sleeper()
    try:
        past = time.time() - 1
        server.set_worker_pids((), starting=True)  # pids not known yet: hold what comes, signal nothing
        write_raw(server.file_path, request(worker.pid, "early", past, signal.SIGTERM))
        write_raw(server.file_path, request(outsider.pid, "evil", past, signal.SIGKILL))
        assert server._wait(lambda: server._request_count == 2, HANG_GUARD)
        assert worker.poll() is None and outsider.poll() is None and server.pop_expired() == []
        server.set_worker_pids([worker.pid])  # the early request was a worker's: fired now
        assert worker.wait(HANG_GUARD) == -signal.SIGTERM
        assert server._wait(lambda: not server.active_timers(), HANG_GUARD)
        assert [(p, s) for p, s, _ in server.pop_expired()] == [(worker.pid, "early")]
        assert outsider.poll() is None
        assert any("refused" in line and str(outsider.pid) in line for line in records.lines())
        server.set_worker_pids(())  # no workers (rendezvous, restart): nobody may be signalled
        write_raw(server.file_path, request(outsider.pid, "evil-2", past, signal.SIGKILL))
        assert server._wait(lambda: server._request_count == 3, HANG_GUARD)
        assert server.active_timers() == [] and outsider.poll() is None
    finally:
        for p in (worker, outsider):
            p.kill()
            p.wait()


def test_launcher_in_rendezvous_signals_no_one(tmp_path):
    fifo = str(tmp_path / "timer.fifo")
    store_port = free_port()
    launcher = Launcher(["--nnodes", "2", "--rdzv-backend", "c10d",
                         "--rdzv-endpoint", "127.0.0.1:%d" % store_port,
                         "--nproc-per-node", "1", os.path.join(SCRIPTS, "printer.py")], tmp_path,
                        environ=env(TORCHELASTIC_TIMER_FILE=fifo))
    outsider = sleeper()
    try:
        wait_for(lambda: os.path.exists(fifo), HANG_GUARD, "the launcher's timer pipe")
        write_raw(fifo, request(outsider.pid, "evil", time.time() - 1, signal.SIGKILL))
        wait_for(lambda: outsider.poll() is not None or "refused" in launcher.err(), HANG_GUARD,
                 "the request handled")
        assert outsider.poll() is None, launcher.err()
        assert "pid %d" % outsider.pid in launcher.err()
    finally:
        launcher.stop()
        outsider.kill()
        outsider.wait()


LONG_WORKER = textwrap.dedent("""
    import os, sys, time
    import elastic
    folder = sys.argv[1]
    open(os.path.join(folder, "ready"), "w").close()
    while not os.path.exists(os.path.join(folder, "go")):
        time.sleep(0.01)
    with elastic.expires(after=60, scope="after-the-second-launcher"):
        pass
""")


def test_second_launcher_on_the_same_timer_file_exits_2(tmp_path):
    fifo = str(tmp_path / "timer.fifo")
    folder = tmp_path / "io"
    folder.mkdir()
    script = tmp_path / "long.py"
    script.write_text(LONG_WORKER)
    environ = env(TORCHELASTIC_TIMER_FILE=fifo)
    first = Launcher(["--standalone", str(script), str(folder)], tmp_path, name="first", environ=environ)
    second = None
    try:
        wait_for(lambda: (folder / "ready").exists(), HANG_GUARD, "the first launcher's worker")
        second = Launcher(["--standalone", str(script), str(folder)], tmp_path, name="second",
                          environ=environ)
        assert second.wait(HANG_GUARD) == 2, second.err()
        err = second.err()
        assert fifo in err and "another launcher" in err and "Traceback" not in err, err
        (folder / "go").touch()
        assert first.wait(HANG_GUARD) == 0, first.err()
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_client_refuses_what_the_server_would_drop(tmp_path):
    path = str(tmp_path / "timer.fifo")
    for sig in (2 ** 31, signal.NSIG, -2 ** 40):
        with pytest.raises(ValueError, match="signal"):
            ops.FileTimerClient(path, signal=sig)
    with pytest.raises(ValueError, match="after"):
        ops.expires(after=float("nan"))


def test_a_timer_without_end_is_kept_not_fired(server):
    victim = sleeper()
    try:
        write_raw(server.file_path, request(victim.pid, "forever", float("inf"), signal.SIGKILL))
        assert server._wait(lambda: server._request_count == 1, HANG_GUARD)
        assert server.active_timers() == [(victim.pid, "forever", float("inf"))] and server._bad_lines == 0
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
