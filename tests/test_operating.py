"""What the launcher tells the person running a job: timestamped lines and a start summary, the
event log, stopping (and a second signal), the failure report's pointers, and `elasticrun status`.
Real launchers, real workers, real signals."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from agent_scripts.harness import (ELASTIC, ROOT, Launcher, StoreProcess, alive, env, kill_all,  # noqa: E402
                                   wait_for, write_script)

sys.path.insert(0, ROOT)
import store as store_module  # noqa: E402

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d \[elasticrun\] "
FAST = ["--monitor-interval", "0.05"]
CONF = "last_call_timeout=1,heartbeat_interval=0.3,heartbeat_timeout=2,join_timeout=60"


def events_of(path):
    with open(str(path)) as f:
        return [json.loads(line) for line in f]


def test_every_line_has_a_timestamp_and_the_start_summary_says_what_runs(tmp_path):
    script = write_script(tmp_path, "ok.py", "import sys\nsys.stderr.write('partial')\n")
    a = Launcher(["--standalone", "--max-restarts", "3", "--log-dir", str(tmp_path / "logs")] + FAST
                 + [script], tmp_path, "a")
    try:
        assert a.wait() == 0, a.err()
        err = a.err()
        # the worker's unterminated line is ended before the launcher's next line
        assert "partial\n" in err, err
        lines = [line for line in err.splitlines() if line != "partial"]
        assert lines and all(re.match(STAMP, line) for line in lines), err
        (summary,) = [line for line in lines if "elasticrun 0." in line]
        (folder,) = os.listdir(str(tmp_path / "logs"))
        for part in ("run ", "rendezvous c10d at 127.0.0.1:", "nnodes 1", "nproc 1", "max restarts 3",
                     "log folder %s" % os.path.join(str(tmp_path / "logs"), folder), "this node 127.0.0.1"):
            assert part in summary, (part, summary)
        assert "all 1 worker succeeded" in err
        # LOGLEVEL as torchrun: WARNING hides the narration
        b = Launcher(["--standalone"] + FAST + [script], tmp_path, "b", environ=env(LOGLEVEL="WARNING"))
        try:
            assert b.wait() == 0
            assert "[elasticrun]" not in b.err(), b.err()
        finally:
            b.stop()
    finally:
        a.stop()


@pytest.mark.parametrize("start", ["bootstrap", "forkserver", "run-path"])
def test_a_python_workers_unterminated_last_line_is_ended_on_a_pipe(tmp_path, start):
    """A pipe (or a terminal) cannot be read back: the worker itself ends its last line as it exits,
    and, before its traceback, the line an uncaught exception interrupts; a worker that ends its
    lines gets no extra newline."""
    scripts = {"exit": "print('no newline', end='')\n",
               "raise": "print('no newline', end='')\nraise SystemError('boom')\n",
               "ended": "print('ended')\n"}
    extra, environ = {"bootstrap": ([], env()), "forkserver": ([], env(ELASTICRUN_FORKSERVER=1)),
                      "run-path": (["--run-path"], env())}[start]
    for name, text in sorted(scripts.items()):
        script = write_script(tmp_path, name + ".py", text)
        p = subprocess.Popen([sys.executable, ELASTIC, "--standalone", "--max-restarts", "0"] + FAST + extra
                             + [script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environ,
                             start_new_session=True)
        try:
            out = p.communicate(timeout=60)[0].decode()
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        assert p.returncode == (1 if name == "raise" else 0), out
        if name == "ended":
            assert "ended\n" in out and "\n\n" not in out, out
            continue
        assert "no newline\n" in out, out
        assert re.search("no newline" + STAMP[:3], out) is None, out
        if name == "raise":
            # (multiprocessing says "Process default-0:" first)
            assert re.search(r"no newline\n(Process \S+:\n)?Traceback", out), out


def test_event_log_of_a_failure_and_a_restart_in_order_with_a_latency_split(tmp_path):
    """Rank 0 fails on the first attempt; rank 1 takes a second to honour SIGTERM, so the restart
    takes about a second, most of it in the stop phase. The split must add up to the restart time
    the workers measured (from the failing exit to the new rank 0's process start, read from
    /proc: the agent's start phase ends when the process exists, before its interpreter has
    started, which on a loaded machine alone can take a tenth of the restart) within 10%."""
    script = write_script(tmp_path, "once.py", (
        "import os, signal, sys, time\n"
        "out = sys.argv[1]\n"
        "rank, attempt = os.environ['RANK'], os.environ['TORCHELASTIC_RESTART_COUNT']\n"
        "with open('/proc/self/stat') as f:\n"
        "    ticks = int(f.read().rsplit(')', 1)[1].split()[19])\n"
        "age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf('SC_CLK_TCK')\n"
        "with open(os.path.join(out, 'start_%s_%s' % (rank, attempt)), 'w') as f:\n"
        "    f.write(repr(time.time() - age))\n"
        "if attempt == '0' and rank == '1':\n"
        "    signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1.0), os._exit(0)))\n"
        "    time.sleep(60)\n"
        "if attempt == '0' and rank == '0':\n"
        "    while not os.path.exists(os.path.join(out, 'start_1_0')):\n"
        "        time.sleep(0.01)\n"
        "    time.sleep(0.2)\n"
        "    with open(os.path.join(out, 'fail'), 'w') as f:\n"
        "        f.write(repr(time.time()))\n"
        "    os._exit(1)\n"))
    out = tmp_path / "out"
    out.mkdir()
    event_log = tmp_path / "events.jsonl"
    a = Launcher(["--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--event-log", str(event_log)]
                 + FAST + [script, str(out)], tmp_path, "a")
    try:
        assert a.wait() == 0, a.err()
        events = events_of(event_log)
        kinds = [e["event"] for e in events]
        assert kinds == [
            "start", "rendezvous", "round", "worker_started", "worker_started",
            "worker_exited", "stopping", "worker_exited", "failure", "restart",
            "rendezvous", "round", "worker_started", "worker_started", "restarted",
            "worker_exited", "worker_exited", "succeeded", "exit"], kinds
        by = {}
        for e in events:
            by.setdefault(e["event"], []).append(e)
        first_exit = by["worker_exited"][0]
        assert (first_exit["rank"], first_exit["code"], first_exit["by_agent"]) == (0, 1, False)
        assert (by["worker_exited"][1]["rank"], by["worker_exited"][1]["by_agent"]) == (1, True)
        assert by["failure"][0]["rank"] == 0 and by["failure"][0]["code"] == 1
        assert (by["restart"][0]["why"], by["restart"][0]["count"], by["restart"][0]["max"]) == ("failure", 1, 1)
        assert by["exit"][0]["code"] == 0 and by["exit"][0]["restarts"] == 1
        assert [e["time"] for e in events] == sorted(e["time"] for e in events)
        split = by["restarted"][0]
        parts = split["detect"] + split["stop"] + split["rendezvous"] + split["start"]
        measured = float((out / "start_0_1").read_text()) - float((out / "fail").read_text())
        assert abs(parts - measured) <= 0.1 * measured, (split, measured)
        assert abs(split["total"] - parts) < 0.005
        # the console line is printed from the same event
        assert ("workers running again %.3g s after the failure" % split["total"]) in a.err(), a.err()
    finally:
        a.stop()


def test_event_log_is_on_by_default_in_the_log_folder_and_can_be_turned_off(tmp_path):
    script = write_script(tmp_path, "ok.py", "pass\n")
    logs = tmp_path / "logs"
    a = Launcher(["--standalone", "--log-dir", str(logs)] + FAST + [script], tmp_path, "a")
    b = None
    try:
        assert a.wait() == 0, a.err()
        (folder,) = os.listdir(str(logs))
        kinds = [e["event"] for e in events_of(logs / folder / "events.jsonl")]
        assert kinds[0] == "start" and kinds[-1] == "exit"
        b = Launcher(["--standalone", "--log-dir", str(tmp_path / "quiet"), "--event-log", "none"] + FAST
                     + [script], tmp_path, "b")
        assert b.wait() == 0, b.err()
        (folder,) = os.listdir(str(tmp_path / "quiet"))
        assert not os.path.exists(str(tmp_path / "quiet" / folder / "events.jsonl"))
        c = Launcher(["--standalone", "--event-log", str(tmp_path / "no" / "such" / "e.jsonl"), script],
                     tmp_path, "c")
        assert c.wait() == 2 and "--event-log" in c.err()
    finally:
        a.stop()
        if b is not None:
            b.stop()


STUBBORN = ("import os, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "open(os.path.join(sys.argv[1], 'up_' + os.environ['RANK']), 'w').close()\n"
            "time.sleep(120)\n")


def _stubborn_job(tmp_path, grace):
    script = write_script(tmp_path, "stubborn.py", STUBBORN)
    out = tmp_path / "out"
    out.mkdir()
    event_log = tmp_path / "events.jsonl"
    a = Launcher(["--standalone", "--nproc-per-node", "2", "--shutdown-timeout", str(grace), "--event-log",
                  str(event_log)] + FAST + [script, str(out)], tmp_path, "a")
    wait_for(lambda: len(os.listdir(str(out))) == 2, what="both workers up", explain=a.err)
    pids = [e["pid"] for e in events_of(event_log) if e["event"] == "worker_started"]
    return a, pids


def test_a_second_stop_signal_kills_at_once(tmp_path):
    a, pids = _stubborn_job(tmp_path, 60)
    try:
        os.kill(a.pid, signal.SIGINT)
        wait_for(lambda: "send the signal again to kill now" in a.err(), what="the stopping line", explain=a.err)
        assert "stopping 2 workers (SIGINT), waiting up to 60 s; send the signal again to kill now" in a.err()
        # the grace narrates itself at a human pace (first after about 2 s), naming who it waits for
        waiting = "still waiting for 2 workers to exit: rank 0 (pid %d), rank 1 (pid %d) (" % tuple(pids)
        wait_for(lambda: waiting in a.err(), what="the grace's narration", explain=a.err)
        stopping, still = (_stamp_of(a.err(), text) for text in ("stopping 2 workers", waiting))
        assert 1.5 <= still - stopping <= 3.0, a.err()
        left = int(re.search(re.escape(waiting) + r"(\d+) s left\)", a.err()).group(1))
        assert 56 <= left <= 58, a.err()
        os.kill(a.pid, signal.SIGTERM)
        sent = time.monotonic()
        code = a.wait(60)
        took = time.monotonic() - sent
        assert code == 128 + signal.SIGINT, a.err()
        assert took < 1.0, (took, a.err())
        assert "second SIGTERM: killing 2 workers now (SIGKILL): rank 0 (pid %d), rank 1 (pid %d)" % tuple(pids) \
            in a.err(), a.err()
        assert "stopped by SIGINT; 2 workers torn down" in a.err()
        assert not any(alive(p) for p in pids)
    finally:
        a.stop()
        kill_all(pids)


def _stamp_of(err, text):
    """The launcher's own time (epoch seconds) on the first line containing `text`."""
    import datetime
    line = next(line for line in err.splitlines() if text in line)
    return datetime.datetime.fromisoformat(line.split(" ", 1)[0]).timestamp()


def _stamps_of(err, text):
    return [_stamp_of(line, text) for line in err.splitlines() if text in line]


def test_the_exit_barrier_narrates_at_a_human_pace(tmp_path):
    """Node a's worker is done at once; node b's holds for 6 s. a says what it waits for, first
    within 3 s, then no more than once a second."""
    script = write_script(tmp_path, "late.py", (
        "import os, time\n"
        "if os.environ['GROUP_RANK'] == '1':\n"
        "    time.sleep(6)\n"))
    store = StoreProcess()
    agents = []
    try:
        for i in range(2):
            agents.append(Launcher(["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", store.endpoint,
                                    "--rdzv-id", "barrier", "--rdzv-conf", CONF, "--local-addr", "127.0.0.%d" % (i + 1)]
                                   + FAST + [script], tmp_path, "n%d" % i))
        for a in agents:
            assert a.wait(60) == 0, a.err()
        err = agents[0].err()
        text = "exit barrier: waiting for the other nodes to finish: 1 of 2 done ("
        lines = _stamps_of(err, text)
        assert lines, err
        done = _stamp_of(err, "all 1 worker succeeded")
        assert lines[0] - done <= 3.0, err
        assert all(b - a >= 1.0 for a, b in zip(lines, lines[1:])), err
        left = int(re.search(re.escape(text) + r"(\d+) s left\)", err).group(1))
        assert 295 <= left <= 298, err
    finally:
        for a in agents:
            a.stop()
        store.stop()


def test_workers_alive_when_the_grace_runs_out_are_named(tmp_path):
    a, pids = _stubborn_job(tmp_path, 0.5)
    try:
        os.kill(a.pid, signal.SIGTERM)
        assert a.wait(60) == 128 + signal.SIGTERM, a.err()
        assert ("2 workers still alive after the 0.5 s grace: rank 0 (pid %d), rank 1 (pid %d); killing them "
                "(SIGKILL)" % tuple(pids)) in a.err(), a.err()
    finally:
        a.stop()
        kill_all(pids)


def test_stopped_before_any_worker_started_says_so(tmp_path):
    store = StoreProcess()
    a = Launcher(["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", store.endpoint, "--rdzv-id",
                  "alone", "--rdzv-conf", CONF, sys.executable], tmp_path, "a")
    try:
        wait_for(lambda: "joining rendezvous" in a.err() or "elasticrun 0." in a.err(), what="the start",
                 explain=a.err)
        os.kill(a.pid, signal.SIGTERM)
        assert a.wait(60) == 128 + signal.SIGTERM
        assert "stopped by SIGTERM; no worker had started" in a.err(), a.err()
        assert "torn down" not in a.err()
    finally:
        a.stop()
        store.stop()


def test_failure_report_points_to_files_that_exist(tmp_path):
    script = write_script(tmp_path, "bad.py", (
        "import os, sys\n"
        "sys.stderr.write('about to fail\\n')\n"
        "if sys.argv[1] == 'raise':\n"
        "    raise ValueError('recorded')\n"
        "sys.exit(3)\n"))
    procs = []
    try:
        a = Launcher(["--standalone", "--max-restarts", "1", "--redirects", "3", "--log-dir", str(tmp_path / "logs")]
                     + FAST + [script, "exit"], tmp_path, "a")
        procs.append(a)
        assert a.wait() == 3
        report = a.err()[a.err().index("FAILED"):]
        assert "restarts   : 1 of 1 (job-wide)" in report, report
        folder = re.search(r"log folder : (\S+) \(on ", report).group(1)
        assert os.path.isdir(folder) and folder.startswith(str(tmp_path / "logs"))
        # it exited 3 without an error file: none is named; its stderr.log is, and exists
        assert "error_file: <N/A>" in report
        stderr_log = re.search(r"stderr    : (\S+)", report).group(1)
        assert stderr_log.endswith("stderr.log") and "about to fail" in open(stderr_log).read()
        # without --redirects/--tee the stderr went to the console: no stderr line
        b = Launcher(["--standalone"] + FAST + [script, "raise"], tmp_path, "b")
        procs.append(b)
        assert b.wait() == 1
        report = b.err()[b.err().index("FAILED"):]
        error_file = re.search(r"error_file: (\S+)", report).group(1)
        assert os.path.exists(error_file) and "stderr    :" not in report
        assert "restarts   : 0 of 0 (job-wide)" in report
    finally:
        for p in procs:
            p.stop()


def _store_snapshot(port, token=None):
    with store_module.TCPStore("127.0.0.1", port, timeout=10, token=token) as s:
        keys = sorted(s.list_keys())
        return dict(zip(keys, s.multi_get(keys))) if keys else {}


def _status(endpoint, run_id, *extra):
    cmd = [sys.executable, ELASTIC, "status", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id] + list(extra)
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), timeout=60)


@pytest.mark.parametrize("with_token", [False, True])
def test_status_reads_a_live_run_and_changes_nothing(tmp_path, with_token):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    conf = CONF + (",token_file=%s" % token_file if with_token else "")
    store = StoreProcess(token_file=str(token_file) if with_token else None)
    script = write_script(tmp_path, "job.py", (
        "import os, sys, time\n"
        "if os.environ['RANK'] == '3' and os.environ['TORCHELASTIC_RESTART_COUNT'] == '0':\n"
        "    sys.exit(3)\n"
        "open(os.path.join(sys.argv[1], 'up_' + os.environ['RANK']), 'w').close()\n"
        "time.sleep(120)\n"))
    out = tmp_path / "out"
    out.mkdir()
    agents, pids = [], []
    try:
        for i in range(2):
            agents.append(Launcher(["--nnodes", "2", "--nproc-per-node", "2", "--max-restarts", "2",
                                    "--rdzv-backend", "c10d", "--rdzv-endpoint", store.endpoint,
                                    "--rdzv-id", "seen", "--rdzv-conf", conf, "--local-addr", "127.0.0.%d" % (i + 1),
                                    "--shutdown-timeout", "2"] + FAST + [script, str(out)], tmp_path, "n%d" % i))
        wait_for(lambda: len(os.listdir(str(out))) == 4, what="4 workers after the restart",
                 explain=lambda: agents[0].err() + agents[1].err())
        token = "s3cret-token" if with_token else None
        for a in agents:   # nothing moves in the store while we look (no heartbeats)
            os.kill(a.pid, signal.SIGSTOP)
        before = _store_snapshot(store.port, token)
        extra = ["--rdzv-conf", "heartbeat_interval=0.3" + (",token_file=%s" % token_file if with_token else "")]
        shown = _status(store.endpoint, "seen", "--json", *extra)
        text = _status(store.endpoint, "seen", *extra)
        after = _store_snapshot(store.port, token)
        assert before == after
        assert shown.returncode == 0, shown.stderr
        info = json.loads(shown.stdout.decode())
        assert info["round"] == 1 and not info["closed"] and info["waiting"] == []
        assert [(m["addr"], m["ranks"]) for m in info["members"]] == [("127.0.0.1", [0, 1]), ("127.0.0.2", [2, 3])]
        assert {m["pid"] for m in info["members"]} == {a.pid for a in agents}
        assert (info["restarts"], info["max_restarts"]) == (1, 2)
        failure = info["last_failure"]
        assert (failure["rank"], failure["code"], failure["round"]) == (3, 3, 0)
        assert text.returncode == 0
        body = text.stdout.decode()
        assert "round 1: 2 nodes" in body and "restarts used: 1 of 2" in body and "rank 3" in body, body
        if with_token:
            refused = _status(store.endpoint, "seen")
            assert refused.returncode == 1 and b"token" in refused.stderr.lower(), refused.stderr
            assert _store_snapshot(store.port, token) == before
        for a in agents:
            os.kill(a.pid, signal.SIGCONT)
    finally:
        for a in agents:
            try:
                os.kill(a.pid, signal.SIGCONT)
            except OSError:
                pass
            a.stop()
        store.stop()


def test_a_dead_member_is_reported_as_lost_not_as_nodes_waiting(tmp_path):
    """Three nodes; one agent is SIGKILLed. The survivor that notices re-joins at once, so the other
    survivor sees a node waiting before its own heartbeat tells it the round broke: it must still
    say that a member was lost (and which), not that nodes wait to join."""
    script = write_script(tmp_path, "hold.py", (
        "import os, sys, time\n"
        "open(os.path.join(sys.argv[1], '%s_%s' % (os.environ['GROUP_WORLD_SIZE'], os.environ['RANK'])), 'w').close()\n"
        "time.sleep(120)\n"))
    out = tmp_path / "out"
    out.mkdir()
    store = StoreProcess()
    agents = []
    try:
        for i in range(3):
            agents.append(Launcher(["--nnodes", "2:3", "--rdzv-backend", "c10d", "--rdzv-endpoint", store.endpoint,
                                    "--rdzv-id", "lost", "--rdzv-conf", CONF, "--local-addr", "127.0.0.%d" % (i + 1),
                                    "--shutdown-timeout", "2", "--event-log", str(tmp_path / ("n%d.jsonl" % i))]
                                   + FAST + [script, str(out)], tmp_path, "n%d" % i))
        wait_for(lambda: len([f for f in os.listdir(str(out)) if f.startswith("3_")]) == 3, what="3 nodes up",
                 explain=lambda: "".join(a.err() for a in agents))
        os.kill(agents[1].pid, signal.SIGKILL)
        wait_for(lambda: len([f for f in os.listdir(str(out)) if f.startswith("2_")]) == 2, what="2 nodes again",
                 explain=lambda: agents[0].err() + agents[2].err())
        for a in (agents[0], agents[2]):
            err = a.err()
            assert "nodes waiting" not in err, err
            assert "member lost: restarting the worker group" in err, err
            assert re.search(r"a node was lost from round 0: .*", err), err
        for i in (0, 2):
            events = events_of(tmp_path / ("n%d.jsonl" % i))
            kinds = [e["event"] for e in events]
            assert "node_lost" in kinds and kinds.index("node_lost") < kinds.index("scale_change"), kinds
            change = events[kinds.index("scale_change")]
            assert (change["from_nodes"], change["to_nodes"]) == (3, 2)
            restart = events[kinds.index("restart")]
            assert restart["why"] == "member lost" and restart["count"] == 0
    finally:
        for a in agents:
            a.stop()
        store.stop()


def _etcd_revision(endpoint):
    import http.client
    host, port = endpoint[len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", "/v3/kv/range", json.dumps({"key": "AA==", "count_only": True}))
        return int(json.loads(conn.getresponse().read())["header"]["revision"])
    finally:
        conn.close()


def test_status_of_an_etcd_run_writes_nothing(etcd_binary, tmp_path):
    """The etcd form. Any write to etcd moves its revision: the revision before and after status
    must be the same while the agents are paused (their heartbeats are 20 s apart, their leases
    last a minute)."""
    from etcd_cluster import EtcdCluster
    script = write_script(tmp_path, "hold.py", (
        "import os, sys, time\n"
        "open(os.path.join(sys.argv[1], 'up_' + os.environ['RANK']), 'w').close()\n"
        "time.sleep(120)\n"))
    out = tmp_path / "out"
    out.mkdir()
    agents = []
    with EtcdCluster(etcd_binary, tmp_path, size=1) as cluster:
        endpoint = cluster.endpoints[0]
        try:
            for i in range(2):
                agents.append(Launcher(["--nnodes", "2", "--rdzv-backend", "etcd", "--rdzv-endpoint", endpoint,
                                        "--rdzv-id", "etcdseen", "--local-addr", "127.0.0.%d" % (i + 1),
                                        "--rdzv-conf", "last_call_timeout=1,heartbeat_interval=20,heartbeat_timeout=60",
                                        "--shutdown-timeout", "2"] + FAST + [script, str(out)], tmp_path, "n%d" % i))
            wait_for(lambda: len(os.listdir(str(out))) == 2, what="2 workers",
                     explain=lambda: agents[0].err() + agents[1].err())
            for a in agents:
                os.kill(a.pid, signal.SIGSTOP)
            before = _etcd_revision(endpoint)
            shown = _status(endpoint, "etcdseen", "--rdzv-backend", "etcd", "--json", "--rdzv-conf",
                            "heartbeat_interval=0.3")
            assert _etcd_revision(endpoint) == before
            assert shown.returncode == 0, shown.stderr
            info = json.loads(shown.stdout.decode())
            assert info["round"] == 0 and len(info["members"]) == 2 and info["last_failure"] is None
            assert sorted(m["addr"] for m in info["members"]) == ["127.0.0.1", "127.0.0.2"]
            assert (info["restarts"], info["max_restarts"]) == (0, 0)
        finally:
            for a in agents:
                try:
                    os.kill(a.pid, signal.SIGCONT)
                except OSError:
                    pass
                a.stop()
