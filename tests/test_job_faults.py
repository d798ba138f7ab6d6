"""A job under faults, load and hostile input (issue 20, first part): every node agrees on failure,
losing the store host stops the survivors, hundreds of workers start, and a worker's error file
can neither hang nor exhaust the agent."""
import os
import signal
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from agent_scripts.harness import Launcher, alive, env, kill_all, pid_files, wait_for  # noqa: E402
from ports import free_port  # noqa: E402

# rank FAIL_RANK exits 3 after FAIL_AFTER seconds; every other rank records its pid and sleeps SLEEP
WORKER = r"""
import os, sys, time
out, rank = sys.argv[1], os.environ["RANK"]
if rank == os.environ.get("FAIL_RANK"):
    time.sleep(float(os.environ.get("FAIL_AFTER", "0")))
    sys.exit(3)
with open(os.path.join(out, "pid_%s_%s" % (rank, os.environ["TORCHELASTIC_RESTART_COUNT"])), "w") as f:
    f.write(str(os.getpid()))
time.sleep(float(os.environ.get("SLEEP", "3")))
"""


def _script(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _two_nodes(tmp_path, tag, script, out, max_restarts, environ, extra=None):
    """Node 0 hosts the store (and holds rank 0), node 1 only connects; both c10d on 127.0.0.1.
    `extra`: more options per node, {"host": [...], "other": [...]}."""
    extra = extra or {}
    endpoint = "127.0.0.1:%d" % free_port()
    conf = "last_call_timeout=1,heartbeat_interval=0.2,heartbeat_timeout=5,join_timeout=60"
    common = ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", tag,
              "--monitor-interval", "0.05", "--shutdown-timeout", "1", "--max-restarts", str(max_restarts)]
    host = Launcher(common + extra.get("host", []) + ["--rdzv-conf", conf + ",is_host=1", "--local-addr", "127.0.0.1", script, out],
                    tmp_path, tag + "_host", environ=environ)
    other = Launcher(common + extra.get("other", []) + ["--rdzv-conf", conf + ",is_host=0", "--local-addr", "127.0.0.2", script, out],
                     tmp_path, tag + "_other", environ=environ)
    return host, other


@pytest.mark.parametrize("max_restarts", [0, 1])
def test_a_failure_on_the_store_host_fails_every_node(tmp_path, max_restarts):
    """The host's worker fails for good while the other node's worker still runs: the host must not
    take the store away before the other node has seen the failure, which then exits non-zero too."""
    script = _script(tmp_path, "worker.py", WORKER)
    for attempt in range(3):
        out = tmp_path / ("out%d" % attempt)
        out.mkdir()
        host, other = _two_nodes(tmp_path, "agree%d_%d" % (max_restarts, attempt), script, str(out),
                                 max_restarts, env(FAIL_RANK=0, SLEEP=4))
        try:
            logs = lambda: "host:\n%s\nother:\n%s" % (host.err()[-3000:], other.err()[-3000:])  # noqa: E731
            assert host.wait(60) == 3, logs()
            code = other.wait(60)
            assert code != 0, logs()
            assert code == 3, logs()   # the root cause is the host's worker, read from the store
        finally:
            host.stop()
            other.stop()
            kill_all(pid_files(out))


def test_a_node_waiting_at_the_exit_barrier_learns_of_a_later_failure(tmp_path):
    """The other node's worker succeeds at once; the host's fails later, for good: the node waiting
    at the exit barrier reports the job's failure instead of its own success."""
    script = _script(tmp_path, "worker.py", WORKER)
    out = tmp_path / "out"
    out.mkdir()
    host, other = _two_nodes(tmp_path, "barrier", script, str(out), 0, env(FAIL_RANK=0, FAIL_AFTER=2, SLEEP=0))
    try:
        assert host.wait(60) == 3, host.err()
        assert other.wait(60) == 3, other.err()
        assert "Root cause" in other.err()
    finally:
        host.stop()
        other.stop()
        kill_all(pid_files(out))


def test_losing_the_store_host_stops_the_survivors(tmp_path):
    """SIGKILL of the store-host agent: the other node's busy worker (it never talks to its peers)
    is stopped and that node exits non-zero saying it lost the store."""
    script = _script(tmp_path, "worker.py", WORKER)
    out = tmp_path / "out"
    out.mkdir()
    host, other = _two_nodes(tmp_path, "lost", script, str(out), 0, env(SLEEP=120))
    pids = []
    try:
        pids = wait_for(lambda: len(pid_files(out)) == 2 and pid_files(out), what="both workers to run")
        survivor = int(open(os.path.join(str(out), "pid_1_0")).read())
        os.kill(host.pid, signal.SIGKILL)
        code = other.wait(60)      # the worker sleeps 120 s: carrying on would time out here
        assert code != 0, other.err()
        assert "lost the store" in other.err()
        assert not alive(survivor)
    finally:
        host.stop()
        other.stop()
        kill_all(pids)


# the worker of global rank R records its pid, sleeps SLEEP_R seconds (0 when not set), exits 0
SLOW_OR_FAST = r"""
import os, sys, time
rank = os.environ["RANK"]
with open(os.path.join(sys.argv[1], "pid_%s_%s" % (rank, os.environ["TORCHELASTIC_RESTART_COUNT"])), "w") as f:
    f.write(str(os.getpid()))
time.sleep(float(os.environ.get("SLEEP_" + rank, "0")))
"""


def _events(path):
    import json
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("slow", ["other", "host"])
def test_a_node_that_times_out_at_the_exit_barrier_never_fails_the_others(tmp_path, slow):
    """--exit-barrier-timeout 1 and one node's worker runs 4 s longer. The fast node gives up
    waiting at the exit barrier: the store host keeps serving until the slow node is done (else the
    slow node loses the store and exits 1); a non-host leaves, and its departure is no lost member
    (the host carries on: no new round, no restart). Both launchers exit 0."""
    script = _script(tmp_path, "worker.py", SLOW_OR_FAST)
    slow_rank = 1 if slow == "other" else 0
    events = {n: str(tmp_path / ("events_%s.jsonl" % n)) for n in ("host", "other")}
    extra = {n: ["--exit-barrier-timeout", "1", "--event-log", events[n]] for n in events}
    host, other = _two_nodes(tmp_path, "exit_" + slow, script, str(tmp_path), 0,
                             env(**{"SLEEP_%d" % slow_rank: 4}), extra)
    try:
        logs = lambda: "host:\n%s\nother:\n%s" % (host.err()[-3000:], other.err()[-3000:])  # noqa: E731
        assert host.wait(60) == 0, logs()
        assert other.wait(60) == 0, logs()
        for node, path in events.items():
            kinds = [e["event"] for e in _events(path)]
            assert kinds.count("round") == 1, (node, kinds, logs())
            assert "restart" not in kinds and "node_lost" not in kinds, (node, kinds, logs())
        if slow == "other":   # the host said why it stayed
            assert "still running" in host.err(), logs()
        else:                 # the node that left is done, not lost: the round was never broken
            assert "broken" not in host.err() and "dead" not in host.err(), logs()
    finally:
        host.stop()
        other.stop()
        kill_all(pid_files(tmp_path))


def test_a_stop_signal_ends_the_store_hosts_wait_after_its_exit_barrier(tmp_path):
    """The store host stays after its exit barrier timed out, yet a stop signal still ends it as
    any stop does: every node stops with 128+N."""
    script = _script(tmp_path, "worker.py", SLOW_OR_FAST)
    extra = {n: ["--exit-barrier-timeout", "1"] for n in ("host", "other")}
    host, other = _two_nodes(tmp_path, "exit_stop", script, str(tmp_path), 0, env(SLEEP_1=120), extra)
    try:
        logs = lambda: "host:\n%s\nother:\n%s" % (host.err()[-3000:], other.err()[-3000:])  # noqa: E731
        wait_for(lambda: "still running" in host.err(), what="the host to wait for the other node",
                 explain=logs)
        os.kill(host.pid, signal.SIGTERM)
        assert host.wait(60) == 128 + signal.SIGTERM, logs()
        assert other.wait(60) == 128 + signal.SIGTERM, logs()
    finally:
        host.stop()
        other.stop()
        kill_all(pid_files(tmp_path))


def test_a_death_after_a_node_finished_and_left_is_still_seen(tmp_path):
    """Three nodes; the second finishes at once and leaves after its 1 s exit barrier, then the
    third one's agent is SIGKILLed: the host (which watched the second in the heartbeat ring) now
    watches the third, and sees it lost (it used to ignore every broken round once a node had
    reached the exit barrier, and ran on as if nothing had happened)."""
    script = _script(tmp_path, "worker.py", SLOW_OR_FAST)
    endpoint = "127.0.0.1:%d" % free_port()
    conf = "last_call_timeout=1,heartbeat_interval=0.2,heartbeat_timeout=5,join_timeout=60"
    events = str(tmp_path / "events_host.jsonl")
    nodes = []
    try:
        for n in range(3):
            args = ["--nnodes", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                    "--rdzv-id", "finished_then_dead", "--monitor-interval", "0.05", "--shutdown-timeout", "1",
                    "--max-restarts", "0", "--exit-barrier-timeout", "1",
                    "--rdzv-conf", conf + ",is_host=%d" % (n == 0), "--local-addr", "127.0.0.%d" % (n + 1)]
            if n == 0:
                args += ["--event-log", events]
            nodes.append(Launcher(args + [script, str(tmp_path)], tmp_path, "node%d" % n,
                                  environ=env(SLEEP_0=120, SLEEP_2=120)))
        logs = lambda: "\n".join("node %d:\n%s" % (n, a.err()[-2000:]) for n, a in enumerate(nodes))  # noqa: E731
        assert nodes[1].wait(60) == 0, logs()
        wait_for(lambda: len(pid_files(tmp_path)) == 3, what="every worker to start", explain=logs)
        os.kill(nodes[2].pid, signal.SIGKILL)
        wait_for(lambda: os.path.exists(events) and "node_lost" in [e["event"] for e in _events(events)],
                 what="the host to see the third node lost", explain=logs)
        assert "dead" in nodes[0].err(), logs()
    finally:
        for a in nodes:
            a.stop()
        kill_all(pid_files(tmp_path))


def _running(marker):
    """Pids of live processes whose command line holds `marker` (fork-server workers keep the
    launcher's command line, which names the script)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % name, "rb") as f:
                if marker.encode() in f.read() and alive(int(name)):
                    pids.append(int(name))
        except OSError:
            pass
    return pids


def test_512_workers_per_node_start_and_finish(tmp_path):
    """Every fork request's reply is read while requests go out: no deadlock on full socket buffers
    (it hung at about 280 workers, about 140 when they exit at once, as these do)."""
    script = _script(tmp_path, "tiny.py", "pass\n")
    a = Launcher(["--standalone", "--nproc-per-node", "512", "--monitor-interval", "0.05", script], tmp_path)
    try:
        assert a.wait(180) == 0, a.err()[-2000:]
    finally:
        a.stop()
        kill_all(_running(script))


def test_a_stop_signal_during_the_start_of_many_workers(tmp_path):
    """SIGTERM while hundreds of workers start: the launcher tears down what it started and leaves."""
    script = _script(tmp_path, "sleepy.py", "import time\ntime.sleep(120)\n")
    a = Launcher(["--standalone", "--nproc-per-node", "512", "--monitor-interval", "0.05",
                  "--shutdown-timeout", "2", script], tmp_path)
    try:
        # the launcher carries the script's name (so does a fork server); a third process is a worker
        wait_for(lambda: len(_running(script)) > 2, what="the first workers to start")
        os.kill(a.pid, signal.SIGTERM)
        assert a.wait(120) == 128 + signal.SIGTERM, a.err()[-2000:]
        wait_for(lambda: not _running(script), 30, "every worker to be gone")
    finally:
        a.stop()
        kill_all(_running(script))


# the worker makes its error file something hostile, then exits with code 5
HOSTILE = r"""
import json, os, sys
path, kind = os.environ["TORCHELASTIC_ERROR_FILE"], sys.argv[1]
if kind == "fifo":
    os.mkfifo(path)
elif kind == "zero":
    os.symlink("/dev/zero", path)
elif kind == "big":
    callstack = "Traceback (most recent call last):\n" + "  File 'x.py', line 1, in f\n" * 600000
    with open(path, "w") as f:
        json.dump({"message": {"message": "ValueError: big", "extraInfo": {
            "py_callstack": callstack + "ValueError: the real end\n", "timestamp": "1"}}}, f)
elif kind == "no-message":
    with open(path, "w") as f:
        json.dump({"unknown_key": "unknown_value"}, f)
elif kind == "not-json":
    with open(path, "w") as f:
        f.write('{"message": {"mess')   # cut short, as a non-atomic writer killed mid-write leaves it
sys.exit(5)
"""

# the launcher under an address-space cap: an agent that reads without bound fails fast, not the machine
CAPPED = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)); "
          "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


@pytest.mark.parametrize("kind", ["fifo", "zero", "big", "no-message", "not-json"])
def test_a_hostile_error_file_neither_hangs_nor_exhausts_the_agent(tmp_path, kind):
    """A FIFO (open would block forever), a symlink to /dev/zero (endless), a ~17 MB file, JSON
    that is not torchelastic's, a file cut short: the launcher reports the worker's own exit code,
    says what was wrong with the file, and prints a bounded report."""
    script = _script(tmp_path, "hostile.py", HOSTILE)
    from agent_scripts.harness import ELASTIC
    a = Launcher(["--standalone", "--monitor-interval", "0.05", script, kind], tmp_path,
                 cmd=[sys.executable, "-c", CAPPED, ELASTIC])
    try:
        assert a.wait(60) == 5, a.err()[-2000:]
        report = a.err()
        assert "exitcode  : 5" in report
        assert len(report) < 3 << 20
        if kind == "big":
            assert "ValueError: the real end" in report   # the traceback's tail is kept
        if kind == "no-message":
            assert "has no 'message' key" in report, report
        if kind == "not-json":
            assert "is not JSON" in report, report
    finally:
        a.stop()
