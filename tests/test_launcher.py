"""The elasticrun launcher as users run it: real launcher processes, real workers, several agents on
one machine meeting through c10d rendezvous on a store process (so any agent may die)."""
import glob
import json
import os
import signal
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from agent_scripts.harness import (ELASTIC, ROOT, SCRIPTS, Launcher, StoreProcess, alive, dumps, env,  # noqa: E402
                                   kill_all, wait_for)

ENVDUMP = os.path.join(SCRIPTS, "envdump.py")
FAIL = os.path.join(SCRIPTS, "fail.py")
FAST = ["--monitor-interval", "0.05", "--shutdown-timeout", "2"]


def c10d(store, nnodes, run_id, *extra):
    conf = "last_call_timeout=1,heartbeat_interval=0.2,heartbeat_timeout=1.5,join_timeout=60"
    return ["--nnodes", nnodes, "--rdzv-backend", "c10d", "--rdzv-endpoint", store.endpoint,
            "--rdzv-id", run_id, "--rdzv-conf", conf] + FAST + list(extra)


def test_standalone_runs_script_module_and_program(tmp_path):
    out = tmp_path / "env"
    out.mkdir()
    procs = []
    try:
        a = Launcher(["--standalone", "--nproc-per-node", "2"] + FAST + [ENVDUMP, str(out)], tmp_path, "a")
        procs.append(a)
        assert a.wait() == 0, a.err()
        d = dumps(out)
        assert sorted(d) == ["default_0_0_2", "default_1_0_2"]
        # one machine: workers meet on 127.0.0.1, never on a host name they would have to resolve
        assert {e["MASTER_ADDR"] for e in d.values()} == {"127.0.0.1"}
        assert "world size 2" in a.err() and "succeeded" in a.err()
        assert "started 2 workers" not in a.err()      # quiet by default
        b = Launcher(["--standalone", "-m", "agent_scripts.envdump", str(out)], tmp_path, "b",
                     cmd=[sys.executable, "-m", "elastic"], environ=env(PYTHONPATH=ROOT + os.pathsep + HERE))
        procs.append(b)
        assert b.wait() == 0, b.err()
        c = Launcher(["--standalone", "--no-python", "--role", "prog", "/bin/sh", "-c", "exit 5"], tmp_path, "c")
        procs.append(c)
        assert c.wait() == 5, c.err()
        assert "exitcode  : 5" in c.err()
    finally:
        for p in procs:
            p.stop()


def test_failure_exit_code_report_and_launcher_error_file(tmp_path):
    err_file = tmp_path / "launcher_error.json"
    procs = []
    try:
        a = Launcher(["--standalone", "--nproc-per-node", "2"] + FAST + [FAIL], tmp_path, "a",
                     environ=env(FAIL_RANK=1, TORCHELASTIC_ERROR_FILE=err_file))
        procs.append(a)
        assert a.wait() == 1
        report = a.err()
        report = report[report.index("Root cause"):]
        assert "message   : ValueError: bad value on rank 1" in report
        assert "rank      : 1 (local_rank: 1" in report
        data = json.loads(err_file.read_text())
        assert data["errorCode"] == 1 and data["message"]["errorCode"] == 1
        assert data["message"]["message"] == "ValueError: bad value on rank 1"
        assert "compute()" in data["message"]["extraInfo"]["py_callstack"]
        b = Launcher(["--standalone"] + FAST + [FAIL, "exit", "7"], tmp_path, "b")
        procs.append(b)
        assert b.wait() == 7
        c = Launcher(["--standalone", "--no-python"] + FAST + ["/bin/sh", "-c", "kill -9 $$"], tmp_path, "c")
        procs.append(c)
        assert c.wait() == 128 + 9
        assert "SIGKILL" in c.err()
        d = Launcher(["--standalone"] + FAST + [os.path.join(SCRIPTS, "recorded.py")], tmp_path, "d")
        procs.append(d)
        assert d.wait() == 1
        assert "KeyError: 'recorded failure on rank 0'" in d.err()
    finally:
        for p in procs:
            p.stop()


def test_restarts_counted_then_budget_spent(tmp_path):
    out = tmp_path / "env"
    out.mkdir()
    logs = tmp_path / "logs"
    a = Launcher(["--standalone", "--nproc-per-node", "2", "--max-restarts", "2", "--log-dir", str(logs)]
                 + FAST + [os.path.join(SCRIPTS, "stamp.py"), "fail"], tmp_path, "a", environ=env(LOGLEVEL="DEBUG"))
    try:
        assert a.wait() == 1
        starts = [line.split() for line in a.out().splitlines() if line.startswith("start")]
        assert sorted(s[3] for s in starts if s[2] == "0") == ["0", "1", "2"]
        assert a.err().count("restarting the worker group") == 2
        assert "worker rank 1 (local rank 1) started" in a.err()      # LOGLEVEL=DEBUG adds detail
        (run_dir,) = os.listdir(str(logs))
        assert sorted(os.listdir(os.path.join(str(logs), run_dir))) == [
            "attempt_0", "attempt_1", "attempt_2", "events.jsonl"]
    finally:
        a.stop()


def _ranks_test(tmp_path, roles, nprocs):
    out = tmp_path / "env"
    out.mkdir()
    store = StoreProcess()
    agents = []
    try:
        n = str(len(nprocs))
        for i, (role, nproc) in enumerate(zip(roles, nprocs)):
            agents.append(Launcher(c10d(store, n, "ranks", "--role", role, "--nproc-per-node", str(nproc),
                                        "--local-addr", "127.0.0.1") + [ENVDUMP, str(out)],
                                   tmp_path, "agent%d" % i))
        for a in agents:
            assert a.wait(120) == 0, a.err()
        envs = list(dumps(out).values())
        total = sum(nprocs)
        assert len(envs) == total
        assert sorted(int(e["RANK"]) for e in envs) == list(range(total))
        by_group = {}
        for e in envs:
            assert e["WORLD_SIZE"] == str(total) and e["GROUP_WORLD_SIZE"] == n
            by_group.setdefault(int(e["GROUP_RANK"]), []).append(e)
        assert sorted(by_group) == list(range(len(nprocs)))
        for group, members in by_group.items():
            ranks = sorted(int(e["RANK"]) for e in members)
            assert ranks == list(range(ranks[0], ranks[0] + len(members)))   # consecutive per node
            assert all(e["LOCAL_WORLD_SIZE"] == str(len(members)) for e in members)
            for e in members:
                assert int(e["RANK"]) - ranks[0] == int(e["LOCAL_RANK"])
        for role in set(roles):
            members = [e for e in envs if e["ROLE_NAME"] == role]
            want = sum(p for r, p in zip(roles, nprocs) if r == role)
            assert sorted(int(e["ROLE_RANK"]) for e in members) == list(range(want))
            assert all(e["ROLE_WORLD_SIZE"] == str(want) for e in members)
            for group, group_members in by_group.items():   # role ranks contiguous per node
                mine = sorted(int(e["ROLE_RANK"]) for e in group_members if e["ROLE_NAME"] == role)
                assert mine == list(range(mine[0], mine[0] + len(mine))) if mine else True
        assert len({e["MASTER_PORT"] for e in envs}) == 1
    finally:
        for a in agents:
            a.stop()
        store.stop()


# Nodes of one role must give the same --nproc-per-node (the rendezvous refuses a node that
# differs); nodes of different roles may differ, so node sizes vary across roles here.

def test_rank_assignment_heterogeneous_roles(tmp_path):
    _ranks_test(tmp_path, ["trainer", "ps", "trainer", "ps", "trainer", "reader", "ps"], [3, 2, 3, 2, 3, 6, 2])


def test_rank_assignment_homogeneous_roles(tmp_path):
    _ranks_test(tmp_path, ["trainer"] * 7, [3] * 7)


def test_rank_assignment_varied_sizes_by_role(tmp_path):
    _ranks_test(tmp_path, ["a", "b", "c", "d", "e", "f", "g"], [4, 3, 5, 1, 2, 6, 4])


@pytest.mark.parametrize("barrier_timeout", [60, 0.3])
def test_workers_drift(tmp_path, barrier_timeout):
    """One node finishes early: it waits in the exit barrier (or gives up on it), and the slow node's
    workers run once, undisturbed, and succeed."""
    out = tmp_path / "env"
    out.mkdir()
    store = StoreProcess()
    agents = []
    try:
        for i, sleep in enumerate(("0", "1.5")):
            agents.append(Launcher(c10d(store, "2", "drift", "--exit-barrier-timeout", str(barrier_timeout))
                                   + [ENVDUMP, str(out)], tmp_path, "agent%d" % i, environ=env(ENVDUMP_AFTER=sleep)))
        for a in agents:
            assert a.wait(60) == 0, a.err()
            assert a.err().count("rendezvous round 0 done") == 1 and "round 1" not in a.err(), a.err()
        assert sorted(dumps(out)) == ["default_0_0_2", "default_1_0_2"]
    finally:
        for a in agents:
            a.stop()
        store.stop()


def test_no_exit_barrier_on_failure_and_job_wide_root_cause(tmp_path):
    """A fails for good: B (one worker finished, one still running) stops at once, not after the 60 s
    barrier, and reports A's worker as the root cause with its exit code."""
    store = StoreProcess()
    agents = []
    try:
        # two roles: nodes of one role must run the same script with the same worker count
        agents.append(Launcher(c10d(store, "2", "nobarrier", "--exit-barrier-timeout", "60", "--role", "a",
                                    "--local-addr", "127.0.0.1") + [FAIL, "exit", "9"],
                               tmp_path, "a", environ=env(FAIL_RANK=0)))
        agents.append(Launcher(c10d(store, "2", "nobarrier", "--exit-barrier-timeout", "60", "--role", "b",
                                    "--nproc-per-node", "2", "--local-addr", "127.0.0.2")
                               + [os.path.join(SCRIPTS, "stamp.py"), "fail"],
                               tmp_path, "b", environ=env(FAIL_RANK=0)))
        # stamp.py fail: rank 0 (on a) never runs it; ranks 1, 2 on b sleep 60 s
        assert agents[0].wait(40) == 9
        assert agents[1].wait(40) == 9, agents[1].err()
        report = agents[1].err()
        assert "Root cause" in report and "rank      : 0 (local_rank: 0" in report
        assert "Other failures" not in report   # b's own workers were stopped, they did not fail
    finally:
        for a in agents:
            a.stop()
        store.stop()


def test_scale_down_when_an_agent_is_sigkilled(tmp_path):
    out = tmp_path / "env"
    out.mkdir()
    store = StoreProcess()
    agents = []
    try:
        for i in range(2):
            agents.append(Launcher(c10d(store, "1:2", "scaledown", "--nproc-per-node", "2",
                                        "--local-addr", "127.0.0.%d" % (i + 1))
                                   + [ENVDUMP, str(out), "hold>2"], tmp_path, "agent%d" % i))
        wait_for(lambda: len([k for k in dumps(out) if k.endswith("_4")]) == 4, what="4 workers of 2 nodes")
        doomed = [e["PID"] for e in dumps(out).values() if e["GROUP_RANK"] == "1"]
        os.kill(agents[1].pid, signal.SIGKILL)
        assert agents[0].wait(60) == 0, agents[0].err()
        assert sorted(k for k in dumps(out) if k.endswith("_2")) == ["default_0_0_2", "default_1_0_2"]
        assert "member" in agents[0].err()
        wait_for(lambda: not any(alive(p) for p in doomed), 10, "the killed agent's workers to die")
    finally:
        for a in agents:
            a.stop()
        store.stop()
        kill_all(e["PID"] for e in dumps(out).values())


def test_console_logs_tee_filters_and_fresh_interpreters(tmp_path):
    """--tee with the prefix, --ranks-filter, --log-dir files; the same with ELASTICRUN_FORKSERVER=1
    (the fork server) and with --run-path (multiprocessing, spawn)."""
    printer = os.path.join(SCRIPTS, "printer.py")
    procs = []
    try:
        for i, (extra, environ) in enumerate([([], None), ([], env(ELASTICRUN_FORKSERVER=1)),
                                              (["--run-path"], None)]):
            logs = tmp_path / ("logs%d" % i)
            a = Launcher(["--standalone", "--nproc-per-node", "3", "--tee", "3", "--ranks-filter", "0,2",
                          "--log-dir", str(logs), "--log-line-prefix-template", "<${rank}>"] + FAST + extra
                         + [printer], tmp_path, "a%d" % i, environ=environ)
            procs.append(a)
            assert a.wait() == 0, a.err()
            assert sorted(a.out().splitlines()) == ["<0>out of rank 0", "<2>out of rank 2"]
            assert "<2>err of rank 2" in a.err() and "rank 1" not in a.err()
            (run_dir,) = os.listdir(str(logs))
            with open(os.path.join(str(logs), run_dir, "attempt_0", "1", "stdout.log")) as f:
                assert f.read() == "out of rank 1\n"
    finally:
        for p in procs:
            p.stop()


def _read_to_eof(fd, timeout):
    """Everything from pipe `fd` until every writer has closed it, within `timeout` seconds."""
    import select
    import time
    chunks, deadline = [], time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError("the console pipe was still open after %s s" % timeout)
        data = os.read(fd, 65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def _stdout_log_complete(logs, rank):
    path = glob.glob(os.path.join(str(logs), "*", "attempt_0", str(rank), "stdout.log"))
    if not path:
        return False
    with open(path[0], "rb") as f:
        return f.read().endswith(b"last line, no newline\n")   # the worker ends it as it exits


def test_tee_to_a_stalled_console_never_blocks_a_worker(tmp_path):
    """--tee with a console nobody reads (its pipe full): the workers still write all their output
    to their stdout.log; once the console is read again it gets every line, in order, prefixed and
    whole, the last one (which the worker leaves without a newline) too, before the launcher exits. For a new interpreter per
    worker, the fork server (ELASTICRUN_FORKSERVER=1) and --run-path (multiprocessing)."""
    import subprocess
    lines = 20000   # about 1 MB a rank: many times what the console's pipe buffer holds
    chatty = os.path.join(SCRIPTS, "chatty.py")
    for i, (extra, environ) in enumerate([([], None), ([], env(ELASTICRUN_FORKSERVER=1)),
                                          (["--run-path"], None)]):
        logs = tmp_path / ("logs%d" % i)
        r, w = os.pipe()   # the launcher's stdout; not read until the workers are done
        proc = None
        try:
            args = ["--standalone", "--nproc-per-node", "2", "--tee", "3", "--log-dir", str(logs),
                    "--log-line-prefix-template", "<${rank}>"] + FAST + extra + [chatty, str(lines)]
            with open(str(tmp_path / ("a%d.err" % i)), "wb") as err:
                proc = subprocess.Popen([sys.executable, ELASTIC] + args, stdout=w, stderr=err,
                                        env=environ or env(), start_new_session=True)
            os.close(w)
            w = None
            for rank in (0, 1):
                wait_for(lambda rank=rank: _stdout_log_complete(logs, rank), timeout=30,
                         what="rank %d's stdout.log with the console stalled" % rank)
            console = _read_to_eof(r, timeout=60).decode().splitlines()
            assert proc.wait(30) == 0
            for rank in (0, 1):
                expected = ["rank %d line %d %s" % (rank, n, "x" * 40) for n in range(lines)]
                expected.append("rank %d last line, no newline" % rank)
                assert [x[3:] for x in console if x.startswith("<%d>" % rank)] == expected
            assert len(console) == 2 * (lines + 1)     # every line whole, with a prefix
            with open(str(tmp_path / ("a%d.err" % i))) as f:
                assert {"<0>err of rank 0", "<1>err of rank 1"} <= set(f.read().splitlines())
        finally:
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
            if proc is not None:
                proc.wait()
            os.close(r)
            if w is not None:
                os.close(w)


def test_run_path_failure_reports_root_cause(tmp_path):
    a = Launcher(["--standalone", "--nproc-per-node", "2", "--run-path"] + FAST + [FAIL], tmp_path,
                 environ=env(FAIL_RANK=1))
    try:
        assert a.wait() == 1
        report = a.err()[a.err().index("Root cause"):]
        assert "rank      : 1 (local_rank: 1" in report and "ValueError: bad value on rank 1" in report
    finally:
        a.stop()


def _free_port_pair():
    """A port P with P+1 free too (when they were looked at)."""
    import socket
    for _ in range(100):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports")


def test_static_backend_two_nodes(tmp_path):
    out = tmp_path / "env"
    out.mkdir()
    port = _free_port_pair()   # workers get P, node 0's store takes P+1
    agents = []
    try:
        for rank in (1, 0):
            agents.append(Launcher(["--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "2",
                                    "--master-addr", "127.0.0.1", "--master-port", str(port)] + FAST
                                   + [ENVDUMP, str(out)], tmp_path, "node%d" % rank))
        for a in agents:
            assert a.wait(60) == 0, a.err()
        envs = dumps(out)
        assert sorted(envs) == ["default_%d_0_4" % r for r in range(4)]
        for e in envs.values():
            assert int(e["RANK"]) // 2 == int(e["GROUP_RANK"])
            assert e["MASTER_PORT"] == str(port)          # --master-port is the workers' (torchrun's)
    finally:
        for a in agents:
            a.stop()


def test_scale_up_when_a_node_joins(tmp_path):
    """A 1:2 job runs on one node; a second agent arrives: the group restarts at world size 4
    without using the restart budget (--max-restarts 0)."""
    out = tmp_path / "env"
    out.mkdir()
    store = StoreProcess()
    agents = []
    try:
        agents.append(Launcher(c10d(store, "1:2", "scaleup", "--nproc-per-node", "2",
                                    "--local-addr", "127.0.0.1") + [ENVDUMP, str(out), "hold<4"],
                               tmp_path, "first"))
        wait_for(lambda: len([k for k in dumps(out) if k.endswith("_2")]) == 2, what="the 1-node round")
        agents.append(Launcher(c10d(store, "1:2", "scaleup", "--nproc-per-node", "2",
                                    "--local-addr", "127.0.0.2") + [ENVDUMP, str(out), "hold<4"],
                               tmp_path, "second"))
        for a in agents:
            assert a.wait(60) == 0, a.err()
        assert sorted(k for k in dumps(out) if k.endswith("_4")) == ["default_%d_0_4" % r for r in range(4)]
        assert "nodes waiting" in agents[0].err()
    finally:
        for a in agents:
            a.stop()
        store.stop()
        kill_all(e["PID"] for e in dumps(out).values())


def test_script_worker_sees_a_plain_python_run(tmp_path):
    """Whichever way workers start (fork server or new interpreter), the script sees what
    `python -u script.py args` gives it: its own `store` module, __main__, argv, exit codes."""
    (tmp_path / "store.py").write_text("WHO = 'user store'\n")
    (tmp_path / "main.py").write_text(
        "import os, sys, store\n"
        "print(store.WHO, __name__, sys.argv[1:], os.path.basename(__file__))\n"
        "if sys.argv[1] == 'bye':\n"
        "    sys.exit('bye now')\n")
    procs = []
    try:
        for i, environ in enumerate([None, env(ELASTICRUN_FORKSERVER=1)]):
            a = Launcher(["--standalone"] + FAST + [str(tmp_path / "main.py"), "ok"], tmp_path, "ok%d" % i,
                         environ=environ)
            procs.append(a)
            assert a.wait() == 0, a.err()
            assert a.out() == "user store __main__ ['ok'] main.py\n"
            b = Launcher(["--standalone"] + FAST + [str(tmp_path / "main.py"), "bye"], tmp_path, "bye%d" % i,
                         environ=environ)
            procs.append(b)
            assert b.wait() == 1
            assert "bye now" in b.err()
    finally:
        for p in procs:
            p.stop()


def test_a_finished_runs_id_reused_fails_loudly(tmp_path):
    """A job that reuses the run id of one that finished on a long-lived store (or etcd) must not
    exit 0 having run nothing: torchrun fails too, since the run is closed."""
    out = tmp_path / "env"
    out.mkdir()
    store = StoreProcess()
    procs = []
    try:
        for name in ("first0", "first1", "again"):
            procs.append(Launcher(c10d(store, "2", "reused", "--local-addr", "127.0.0.%d" % (len(procs) + 1))
                                  + [ENVDUMP, str(out)], tmp_path, name))
            if name == "first1":
                assert [p.wait(60) for p in procs] == [0, 0], procs[0].err() + procs[1].err()
        again = procs[-1]
        assert again.wait(60) == 2, again.err()   # a mistake in the options: --rdzv-id
        assert "closed before this node joined" in again.err() and "run id" in again.err()
        assert sorted(dumps(out)) == ["default_0_0_2", "default_1_0_2"]   # the second job started nothing
    finally:
        for p in procs:
            p.stop()
        store.stop()


def test_script_workers_objects_are_finalized_at_exit(tmp_path):
    """A file the script never closes is written, and its objects' __del__ run, as under python."""
    (tmp_path / "main.py").write_text(
        "import os, sys\n"
        "f = open(os.path.join(sys.argv[1], 'out.txt'), 'w')\n"
        "f.write('result\\n')          # never closed\n"
        "class Final:\n"
        "    def __init__(self, path):\n"
        "        self.path, self.open = path, open\n"
        "    def __del__(self):\n"
        "        self.open(self.path, 'w').close()\n"
        "keep = Final(os.path.join(sys.argv[1], 'finalized'))\n")
    procs = []
    try:
        for i, environ in enumerate([None, env(ELASTICRUN_FORKSERVER=1)]):
            out = tmp_path / ("run%d" % i)
            out.mkdir()
            procs.append(Launcher(["--standalone"] + FAST + [str(tmp_path / "main.py"), str(out)], tmp_path,
                                  "run%d" % i, environ=environ))
            assert procs[-1].wait() == 0, procs[-1].err()
            assert (out / "out.txt").read_text() == "result\n"
            assert (out / "finalized").exists()
    finally:
        for p in procs:
            p.stop()


def test_zipapps_directories_symlinks_and_tracebacks_as_under_python(tmp_path):
    """What `python PATH` accepts, a worker accepts: a zipapp, a directory with __main__.py, a
    symlinked script importing from its real folder; a traceback starts at the script's frames."""
    import zipapp
    app = tmp_path / "app"
    app.mkdir()
    (app / "__main__.py").write_text("import sys\nprint('app', sys.argv[1:])\n")
    zipapp.create_archive(str(app), str(tmp_path / "app.pyz"))
    real = tmp_path / "real"
    real.mkdir()
    (real / "helper.py").write_text("WHO = 'helper'\n")
    (real / "train.py").write_text("import helper\nprint(helper.WHO)\n")
    links = tmp_path / "links"
    links.mkdir()
    (links / "train.py").symlink_to(real / "train.py")
    (tmp_path / "boom.py").write_text("def boom():\n    raise ValueError('boom')\nboom()\n")
    cases = [(app, "app ['x']\n"), (tmp_path / "app.pyz", "app ['x']\n"), (links / "train.py", "helper\n")]
    procs = []
    try:
        for i, environ in enumerate([None, env(ELASTICRUN_FORKSERVER=1)]):
            for j, (path, expected) in enumerate(cases):
                procs.append(Launcher(["--standalone"] + FAST + [str(path), "x"], tmp_path, "c%d%d" % (i, j),
                                      environ=environ))
                assert procs[-1].wait() == 0, procs[-1].err()
                assert procs[-1].out() == expected
            procs.append(Launcher(["--standalone"] + FAST + [str(tmp_path / "boom.py")], tmp_path, "boom%d" % i,
                                  environ=environ))
            assert procs[-1].wait() == 1
            lines = procs[-1].err().splitlines()
            first = lines[lines.index("Traceback (most recent call last):") + 1]
            assert "boom.py" in first, procs[-1].err()
    finally:
        for p in procs:
            p.stop()


def test_local_rank_macro_in_script_args_for_every_kind_of_worker(tmp_path):
    # one write per line: the two workers share the console, and print() under python -u writes
    # its parts separately
    (tmp_path / "show.py").write_text("import os, sys\n"
                                      "sys.stdout.write('%s %s\\n' % (os.environ['LOCAL_RANK'], sys.argv[1:]))\n")
    procs = []
    try:
        for i, (extra, environ) in enumerate([([], None), ([], env(ELASTICRUN_FORKSERVER=1)),
                                              (["--run-path"], None)]):
            procs.append(Launcher(["--standalone", "--nproc-per-node", "2"] + FAST + extra
                                  + [str(tmp_path / "show.py"), "--out=dir_${local_rank}", "$x"],
                                  tmp_path, "m%d" % i, environ=environ))
            assert procs[-1].wait() == 0, procs[-1].err()
            assert sorted(procs[-1].out().splitlines()) == ["0 ['--out=dir_0', '$x']", "1 ['--out=dir_1', '$x']"]
    finally:
        for p in procs:
            p.stop()


TWO_ROUNDS = """
import os, sys, time
folder, node = sys.argv[1], os.environ["NODE"]
attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
open(os.path.join(folder, "%s-%s" % (node, attempt)), "w").close()
if attempt == "0":
    if node == "b":
        raise RuntimeError("round zero's failure")
    time.sleep(60)          # stopped by the agent: b failed
deadline = time.monotonic() + 60
while not os.path.exists(os.path.join(folder, "go")) and time.monotonic() < deadline:
    time.sleep(0.01)
if node == "b":
    raise RuntimeError("round one's failure")
"""


def test_report_is_the_last_rounds_even_when_the_store_is_gone(tmp_path):
    """Round 0's failures were exchanged through the store; round 1's cannot be (the store died):
    the report shows round 1's failure, never round 0's. b looks at its peers only every 30 s, so it
    sees its worker fail before it notices the lost store."""
    folder = tmp_path / "io"
    folder.mkdir()
    script = str(tmp_path / "two_rounds.py")
    with open(script, "w") as f:
        f.write(TWO_ROUNDS)
    store = StoreProcess()
    agents = []
    try:
        for node, interval in (("a", "0.05"), ("b", "30")):
            agents.append(Launcher(c10d(store, "2", "stale", "--max-restarts", "1", "--monitor-interval", interval)
                                   + [script, str(folder)], tmp_path, node, environ=env(NODE=node)))
        wait_for(lambda: (folder / "a-1").exists() and (folder / "b-1").exists(), what="round 1 on both")
        store.stop()
        (folder / "go").touch()
        assert agents[1].wait(60) == 1, agents[1].err()
        report = agents[1].err().split("=" * 72, 1)[1]   # after the workers' own tracebacks
        assert "RuntimeError: round one's failure" in report
        assert "round zero" not in report
    finally:
        for a in agents:
            a.stop()
        store.stop()


def test_stop_signal_in_the_exit_barrier_exits_128_plus_n(tmp_path):
    """a's workers succeeded and a waits for b in the exit barrier: a SIGTERM there is a stop."""
    folder = tmp_path / "io"
    folder.mkdir()
    script = str(tmp_path / "wait_on_b.py")
    with open(script, "w") as f:
        f.write("import os, sys, time\n"
                "if os.environ['NODE'] == 'b':\n"
                "    while not os.path.exists(sys.argv[1]):\n"
                "        time.sleep(0.05)\n")
    store = StoreProcess()
    agents = []
    try:
        for node in ("a", "b"):
            agents.append(Launcher(c10d(store, "2", "barrier-stop", "--exit-barrier-timeout", "60")
                                   + [script, str(folder / "never")], tmp_path, node, environ=env(NODE=node)))
        a = agents[0]
        wait_for(lambda: "all 1 worker succeeded" in a.err(), what="a's workers to succeed")
        os.kill(a.pid, signal.SIGTERM)
        assert a.wait(60) == 128 + signal.SIGTERM, a.err()
        assert "stopped by SIGTERM" in a.err()
    finally:
        for a in agents:
            a.stop()
        store.stop()


BIND_MASTER_PORT = """
import os, socket
port = int(os.environ["MASTER_PORT"])
print("rank %s master %s:%d" % (os.environ["RANK"], os.environ["MASTER_ADDR"], port), flush=True)
if os.environ["LOCAL_RANK"] == "0":   # what init_method=tcp://MASTER_ADDR:MASTER_PORT does on rank 0
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
"""


def test_master_port_is_the_workers_and_left_free_for_them(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "bind.py"
    script.write_text(BIND_MASTER_PORT)
    a = Launcher(["--nproc-per-node", "2", "--master-addr", "localhost", "--master-port", str(port),
                  "--tee", "3"] + FAST + [str(script)], tmp_path)
    try:
        assert a.wait() == 0, a.err()
        for rank in (0, 1):
            assert "rank %d master localhost:%d" % (rank, port) in a.out(), a.out()
    finally:
        a.stop()


def test_option_prefixes_as_argparse_takes_them(tmp_path):
    out = tmp_path / "env"
    out.mkdir()
    a = Launcher(["--standalone", "--nproc=2", "--redirect", "3", "--monitor-int=0.05"] + [ENVDUMP, str(out)],
                 tmp_path, "a")
    b = Launcher(["--standalone", "--r=3", ENVDUMP, str(out)], tmp_path, "b")
    try:
        assert a.wait() == 0, a.err()
        assert sorted(dumps(out)) == ["default_0_0_2", "default_1_0_2"]
        assert b.wait() == 2
        assert b.err().startswith("elasticrun: error: ambiguous option --r could match ")
        assert "--redirects" in b.err() and "--rdzv-conf" in b.err() and "--rdzv_conf" not in b.err()
    finally:
        a.stop()
        b.stop()


def test_unknown_rdzv_conf_keys_warn_once_and_the_job_runs(tmp_path):
    out = tmp_path / "env"
    out.mkdir()
    # quoted as for a shell that never saw it (a job spec); torch's `timeout` and an unknown key
    a = Launcher(["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
                  "--rdzv-conf", "'is_host=1,timeout=30,colour=blue'"] + FAST + [ENVDUMP, str(out)], tmp_path)
    try:
        assert a.wait() == 0, a.err()
        assert a.err().count("'colour'") == 1, a.err()
        assert "'timeout'" not in a.err() and "'is_host" not in a.err()
    finally:
        a.stop()


PLACEMENT = """
import json, os, sys
rank = os.environ["RANK"]
print("apple %s" % rank, flush=True)
print("pear, %s" % rank, flush=True)
print("pear %s" % rank, flush=True)
print("plum %s" % rank, file=sys.stderr, flush=True)
with open(os.path.join(sys.argv[1], rank), "w") as f:
    json.dump({"LOCAL_RANK": os.environ["LOCAL_RANK"], "GPU": os.environ.get("CUDA_VISIBLE_DEVICES"),
               "cpus": sorted(os.sched_getaffinity(0)),
               "leaked": [k for k in os.environ if k.startswith("ELASTICRUN_CPU")]}, f)
"""


def _placements(out):
    return {int(name): json.loads((out / name).read_text()) for name in os.listdir(str(out))}


def test_torchrun_2_13_worker_options(tmp_path):
    script = tmp_path / "placement.py"
    script.write_text(PLACEMENT)
    logs = tmp_path / "logs"
    allowed = sorted(os.sched_getaffinity(0))
    procs = []
    try:
        for name, extra, environ, kind in (
                ("virtual", ["--virtual-local-rank", "--numa-binding", "exclusive", "--tee", "3",
                             "--duplicate-stdout-filters", "apple,pear,,", "--duplicate_stderr_filters=plum",
                             "--log-dir", str(logs), "--logs-specs", "default", "--event-log-handler", "x"],
                 env(CUDA_VISIBLE_DEVICES="5,7"), "script"),
                ("program", ["--numa-binding", "node", "--no-python", sys.executable], None, "program"),
                ("function", ["--numa-binding", "exclusive", "--run-path"], None, "function")):
            out = tmp_path / name
            out.mkdir()
            a = Launcher(["--standalone", "--nproc-per-node", "2"] + FAST + extra + [str(script), str(out)],
                         tmp_path, name, environ=environ)
            procs.append(a)
            assert a.wait() == 0, a.err()
            got = _placements(out)
            assert sorted(got) == [0, 1]
            for rank, p in got.items():
                assert p["leaked"] == [], kind      # the binding's carrier never reaches the script
                assert set(p["cpus"]) <= set(allowed) and p["cpus"], kind
            if name == "virtual":
                assert [got[r]["LOCAL_RANK"] for r in (0, 1)] == ["0", "0"]
                assert [got[r]["GPU"] for r in (0, 1)] == ["5", "7"]
            else:
                assert [got[r]["LOCAL_RANK"] for r in (0, 1)] == ["0", "1"]
            if "exclusive" in extra and len(allowed) >= 2:
                assert not set(got[0]["cpus"]) & set(got[1]["cpus"]), got
            if "node" in extra:
                assert got[0]["cpus"] == got[1]["cpus"]
        stdout = glob.glob(str(logs / "*" / "attempt_0" / "filtered_stdout.log"))
        stderr = glob.glob(str(logs / "*" / "attempt_0" / "filtered_stderr.log"))
        assert len(stdout) == 1 and len(stderr) == 1
        with open(stdout[0]) as f:
            lines = sorted(f.read().splitlines())
        assert lines == ["[default0]:apple 0", "[default0]:pear, 0", "[default1]:apple 1", "[default1]:pear, 1"]
        with open(stderr[0]) as f:
            assert sorted(f.read().splitlines()) == ["[default0]:plum 0", "[default1]:plum 1"]
    finally:
        for p in procs:
            p.stop()


@pytest.mark.parametrize("args, needle", [
    (["--logs-specs", "mine"], "--logs-specs 'mine': elasticrun has only its built-in 'default'"),
    (["--numa-binding", "nodes"], "--numa-binding 'nodes' is not one of node, socket, exclusive, core-complex"),
    (["--use-env"], "unrecognized option --use-env (torch.distributed.launch's"),
])
def test_refused_torchrun_option_values(tmp_path, args, needle):
    a = Launcher(["--standalone"] + args + [ENVDUMP, str(tmp_path)], tmp_path)
    try:
        assert a.wait() == 2
        assert a.err().startswith("elasticrun: error: ") and needle in a.err(), a.err()
    finally:
        a.stop()


def test_script_workers_are_what_torchrun_starts(tmp_path):
    """A worker is `python -u SCRIPT ARGS` as torchrun's: its command line shows the script and its
    arguments (`ps`, `pkill -f train.py`), and the launcher's interpreter flags do not leak into it
    (`python3 -I -S elasticrun.pyz` must not give workers -I -S: no site-packages, no torch)."""
    import subprocess
    bundle = tmp_path / "elasticrun.pyz"
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_bundle.py"), "-o", str(bundle)],
                   check=True, stdout=subprocess.DEVNULL, timeout=60)
    identity = os.path.join(SCRIPTS, "identity.py")
    procs = []
    try:
        a = Launcher(["--standalone", "--nproc-per-node", "2"] + FAST + [identity, str(tmp_path), "--lr", "0.1"],
                     tmp_path, "a", cmd=[sys.executable, "-I", "-S", str(bundle)])
        procs.append(a)
        assert a.wait() == 0, a.err()
        plain = subprocess.run([sys.executable, "-u", identity, str(tmp_path), "--lr", "0.1"], env=env(),
                               timeout=60)
        assert plain.returncode == 0
    finally:
        for p in procs:
            p.stop()
    with open(str(tmp_path / "identity.plain.json")) as f:
        want = json.load(f)
    for rank in (0, 1):
        with open(str(tmp_path / ("identity.%d.json" % rank))) as f:
            got = json.load(f)
        assert got["cmdline"][0] == sys.executable and got["cmdline"][-4:] == [identity, str(tmp_path), "--lr", "0.1"]
        assert "--nproc-per-node" not in got["cmdline"]     # not the launcher's command line
        assert got["flags"] == want["flags"]
        assert got["argv"] == want["argv"] and got["loader"] == want["loader"]
        # the bundle adds itself to the workers' PYTHONPATH (documented), nothing else differs
        assert [p for p in got["path"] if p != str(bundle)] == want["path"]
        assert not got["boot_in_env"]



@pytest.mark.parametrize("run_id", ["../esc", "../../esc", "a/b", "job.42", "none",
                                    "8c1f0e6e-0d2b-4a3c-9f7e-2f5d1c9b7a10", "x" * 255])
def test_run_ids_are_data_never_paths(tmp_path, run_id):
    """A run id names the run's log folder encoded: it never leaves --log-dir, whatever it holds."""
    logs = tmp_path / "x" / "logs"
    a = Launcher(["--log-dir", str(logs), "--redirects", "3", "--rdzv-id", run_id] + FAST
                 + [os.path.join(SCRIPTS, "printer.py")], tmp_path)
    try:
        assert a.wait() == 0, a.err()
    finally:
        a.stop()
    runs = os.listdir(str(logs))
    assert len(runs) == 1, runs
    assert os.path.exists(os.path.join(str(logs), runs[0], "attempt_0", "0", "stdout.log"))
    assert sorted(os.listdir(str(tmp_path))) == ["agent.err", "agent.out", "x"]
    assert os.listdir(str(tmp_path / "x")) == ["logs"]


def test_a_full_log_file_system_is_named_in_the_report(tmp_path):
    """Workers that die because their log folder's file system is full cannot say so themselves (their
    stderr and error file are there): the report says ENOSPC and names the folder."""
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.call(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)],
                       stderr=subprocess.DEVNULL) != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    a = None
    try:
        script = tmp_path / "flood.py"
        script.write_text("import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 1023 + '\\n')\n")
        a = Launcher(["--standalone", "--log-dir", str(full), "--redirects", "3"] + FAST + [str(script)],
                     tmp_path)
        assert a.wait() != 0, a.err()
        err = a.err()
        assert "ENOSPC" in err, err
        assert "message   : exited with code" in err and str(full) in err.split("ENOSPC")[0], err
    finally:
        if a is not None:
            a.stop()
        subprocess.call(["umount", "-l", str(full)])


def listening_addresses(port):
    """The local addresses something listens on at TCP `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            for line in f.read().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


def test_standalone_store_takes_a_random_token_and_listens_on_loopback(tmp_path):
    """Without a token one write to the store controls a job; --standalone always has one."""
    import re
    import store
    go = tmp_path / "go"
    script = tmp_path / "wait.py"
    script.write_text("import os, time\nwhile not os.path.exists(%r):\n    time.sleep(0.01)\n" % str(go))
    a = Launcher(["--standalone"] + FAST + [str(script)], tmp_path, environ=env(LOGLEVEL="DEBUG"))
    try:
        port = int(wait_for(lambda: re.search(r"serving the rendezvous store on port (\d+)", a.err()),
                            what="the store's port").group(1))
        with pytest.raises(store.StoreAuthError):
            store.TCPStore("127.0.0.1", port, timeout=10).set("elastic/closed", "1")
        assert listening_addresses(port) == {"0100007F"}   # 127.0.0.1 only
        go.write_text("")
        assert a.wait() == 0, a.err()
    finally:
        a.stop()
