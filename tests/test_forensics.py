"""When a job goes wrong (issue 18): the stack of a rank the agent kills is in the report and the
error file; `elasticrun stacks` groups a live job's stacks; one stop signal stops every node."""
import glob
import json
import os
import signal
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from agent_scripts.harness import ROOT, Launcher, alive, env, kill_all, pid_files, wait_for  # noqa: E402

# a worker hung in time.sleep inside stuck_here(), under a 1 s file-timer scope
HUNG = r"""
import os, sys, time
sys.path.insert(0, os.environ["ELASTIC_ROOT"])
import elastic

def stuck_here():
    time.sleep(60)  # HANG

with elastic.expires(after=1):
    stuck_here()
"""

# a worker that ignores SIGTERM, says it is ready, and sleeps inside stuck_here()
DEAF = r"""
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)

def stuck_here():
    open(os.path.join(os.environ["OUT"], "ready_%s" % os.environ["RANK"]), "w").close()
    time.sleep(60)  # HANG

stuck_here()
"""


def _script(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _line(text, mark="# HANG"):
    return next(i for i, line in enumerate(text.split("\n"), 1) if mark in line)


def _error_files(log_dir):
    return glob.glob(os.path.join(str(log_dir), "*", "attempt_*", "*", "error.json"))


@pytest.mark.parametrize("fork_server", ["1", "0"])
def test_a_rank_killed_by_the_file_timer_is_reported_with_its_stack(tmp_path, fork_server):
    script = _script(tmp_path, "hung.py", HUNG)
    where = "hung.py:%d" % _line(HUNG)
    launcher_error = str(tmp_path / "launcher_error.json")
    a = Launcher(["--standalone", "--nproc-per-node", "1", "--max-restarts", "0", "--log-dir",
                  str(tmp_path / "logs"), script], tmp_path,
                 environ=env(ELASTIC_ROOT=ROOT, TORCHELASTIC_ENABLE_FILE_TIMER=1,
                             TORCHELASTIC_ERROR_FILE=launcher_error, ELASTICRUN_FORKSERVER=fork_server))
    try:
        assert a.wait(60) == 128 + signal.SIGKILL, a.err()
        report = a.err()
        assert "in stuck_here (%s)" % where in report, report
        assert 'line %d in stuck_here' % _line(HUNG) in report, report
        with open(launcher_error) as f:
            data = json.load(f)
        assert "stuck_here" in data["message"]["message"]
        assert 'line %d in stuck_here' % _line(HUNG) in data["message"]["extraInfo"]["stack"]
        (worker_error,) = _error_files(tmp_path / "logs")
        with open(worker_error) as f:
            assert 'line %d in stuck_here' % _line(HUNG) in json.load(f)["message"]["extraInfo"]["stack"]
    finally:
        a.stop()


def test_a_rank_killed_after_the_grace_period_is_reported_with_its_stack(tmp_path):
    script = _script(tmp_path, "deaf.py", DEAF)
    out = tmp_path / "out"
    out.mkdir()
    a = Launcher(["--standalone", "--nproc-per-node", "2", "--shutdown-timeout", "0.5", "--log-dir",
                  str(tmp_path / "logs"), script], tmp_path, environ=env(OUT=out))
    try:
        wait_for(lambda: len(os.listdir(str(out))) == 2, what="both workers to be ready")
        os.kill(a.pid, signal.SIGTERM)
        assert a.wait(60) == 128 + signal.SIGTERM, a.err()
        report = a.err()
        for rank in (0, 1):
            assert "rank %d (pid" % rank in report, report
        assert "outlived the 0.5 s grace period after SIGTERM: SIGKILL; in stuck_here (deaf.py:%d)" % (
            _line(DEAF)) in report, report
        files = _error_files(tmp_path / "logs")
        assert len(files) == 2
        for path in files:
            with open(path) as f:
                data = json.load(f)
            assert "stuck_here" in data["message"]["message"]
            assert 'line %d in stuck_here' % _line(DEAF) in data["message"]["extraInfo"]["stack"]
    finally:
        a.stop()


def test_a_program_worker_is_reported_as_having_no_python_stack(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    a = Launcher(["--standalone", "--nproc-per-node", "1", "--shutdown-timeout", "0.5", "--no-python",
                  "/bin/sh", "-c", 'trap "" TERM; touch "$OUT/ready"; sleep 60'], tmp_path,
                 environ=env(OUT=out))
    try:
        wait_for(lambda: os.listdir(str(out)), what="the worker to be ready")
        os.kill(a.pid, signal.SIGTERM)
        assert a.wait(60) == 128 + signal.SIGTERM, a.err()
        assert "outlived the 0.5 s grace period" in a.err()
        assert "not a Python worker: no stack" in a.err(), a.err()
    finally:
        a.stop()


# records the signals it gets; rank DEAF_RANK ignores SIGTERM (and records it all the same)
RECORDER = r"""
import os, signal, sys, time
out, rank = os.environ["OUT"], os.environ["RANK"]

def note(signum, frame):
    with open(os.path.join(out, "got_%s_%s" % (rank, signal.Signals(signum).name)), "w") as f:
        f.write(str(os.getpid()))
    if signum == signal.SIGTERM and rank != os.environ.get("DEAF_RANK"):
        sys.exit(0)

for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, note)
with open(os.path.join(out, "pid_%s" % rank), "w") as f:
    f.write(str(os.getpid()))
while True:
    time.sleep(0.5)
"""


def _nodes(tmp_path, tag, script, count, environ, extra=(), conf="", etcd=None):
    """`count` agents of one c10d job on 127.0.0.1, the first serving the store (or of an etcd job
    on the endpoint `etcd`)."""
    from ports import free_port
    endpoint = etcd or "127.0.0.1:%d" % free_port()
    conf = "last_call_timeout=1,heartbeat_interval=0.2,heartbeat_timeout=5,join_timeout=60" + conf
    common = ["--nnodes", str(count), "--rdzv-backend", "etcd" if etcd else "c10d", "--rdzv-endpoint", endpoint,
              "--rdzv-id", tag, "--monitor-interval", "0.05", "--max-restarts", "0",
              "--local-addr", "127.0.0.1"] + list(extra)
    host = lambda i: "" if etcd else ",is_host=1" if i == 0 else ",is_host=0"  # noqa: E731
    return [Launcher(common + ["--rdzv-conf", conf + host(i), script],
                     tmp_path, "%s_%d" % (tag, i), environ=environ) for i in range(count)], endpoint


@pytest.mark.parametrize("signalled", [0, 1], ids=["store_host", "other"])
def test_a_stop_signal_to_one_agent_stops_every_node(tmp_path, signalled):
    """SIGTERM to one of 3 agents: every node's worker gets SIGTERM, the one ignoring it (rank 2)
    is killed after its own node's grace, every agent exits 143 (none says "lost the store")."""
    script = _script(tmp_path, "recorder.py", RECORDER)
    out = tmp_path / "out"
    out.mkdir()
    agents, _ = _nodes(tmp_path, "stop", script, 3, env(OUT=out, DEAF_RANK=2), ["--shutdown-timeout", "1"])
    pids = []
    try:
        pids = wait_for(lambda: len(pid_files(out)) == 3 and pid_files(out), what="3 workers to run")
        with open(os.path.join(str(out), "pid_2")) as f:
            deaf = int(f.read())
        os.kill(agents[signalled].pid, signal.SIGTERM)
        logs = lambda: "\n".join("agent %d:\n%s" % (i, a.err()[-2000:]) for i, a in enumerate(agents))  # noqa: E731
        for a in agents:
            assert a.wait(60) == 128 + signal.SIGTERM, logs()
        for rank in range(3):
            assert os.path.exists(os.path.join(str(out), "got_%d_SIGTERM" % rank)), logs()
        assert not alive(deaf)
        deaf_node = next(a for a in agents if "rank 2 (pid %d) outlived the 1 s grace period" % deaf in a.err())
        assert "stopped by SIGTERM" in deaf_node.err()
    finally:
        for a in agents:
            a.stop()
        kill_all(pids)


def test_a_checkpoint_signal_to_one_agent_reaches_every_worker_and_stops_nothing(tmp_path):
    script = _script(tmp_path, "recorder.py", RECORDER)
    out = tmp_path / "out"
    out.mkdir()
    agents, _ = _nodes(tmp_path, "usr1", script, 2, env(OUT=out), ["--shutdown-timeout", "1"])
    pids = []
    try:
        pids = wait_for(lambda: len(pid_files(out)) == 2 and pid_files(out), what="2 workers to run")
        os.kill(agents[1].pid, signal.SIGUSR1)
        for rank in range(2):
            wait_for(lambda: os.path.exists(os.path.join(str(out), "got_%d_SIGUSR1" % rank)),
                     what="rank %d to get SIGUSR1" % rank)
        assert all(alive(pid) for pid in pids)
        assert all(a.proc.poll() is None for a in agents)
    finally:
        for a in agents:
            a.stop()
        kill_all(pids)


STACKY = r"""
import os, time

def waiting_here():
    while True:
        time.sleep(0.2)

def odd_one_out():
    while True:
        time.sleep(0.2)

with open(os.path.join(os.environ["OUT"], "pid_%s" % os.environ["RANK"]), "w") as f:
    f.write(str(os.getpid()))
(odd_one_out if os.environ["RANK"] == "3" else waiting_here)()
"""


def test_stacks_groups_the_ranks_of_a_live_job_by_stack(tmp_path):
    """2 nodes x 2 workers, rank 3 in another function, a store with a token: 2 groups."""
    import subprocess
    from agent_scripts.harness import ELASTIC
    script = _script(tmp_path, "stacky.py", STACKY)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    out = tmp_path / "out"
    out.mkdir()
    agents, endpoint = _nodes(tmp_path, "stacks", script, 2, env(OUT=out),
                              ["--nproc-per-node", "2"], conf=",token_file=%s" % token)
    pids = []
    try:
        pids = wait_for(lambda: len(pid_files(out)) == 4 and pid_files(out), what="4 workers to run")
        cmd = subprocess.run([sys.executable, ELASTIC, "stacks", "--rdzv-endpoint", endpoint, "--rdzv-id", "stacks",
                              "--rdzv-conf", "token_file=%s" % token], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env(), timeout=60)
        text = cmd.stdout.decode()
        assert cmd.returncode == 0, cmd.stderr.decode()
        heads = [line for line in text.split("\n") if line.startswith("rank")]
        assert heads == ["ranks 0-2: in waiting_here (stacky.py:6)", "rank 3: in odd_one_out (stacky.py:10)"], text
        assert all(a.proc.poll() is None for a in agents)
        # the stack signal to one agent: it logs the same
        os.kill(agents[1].pid, signal.SIGRTMIN + 6)
        logged = wait_for(lambda: "rank 3: in odd_one_out (stacky.py:10)" in agents[1].err() and agents[1].err(),
                          what="the agent to log the job's stacks", explain=agents[1].err)
        assert "ranks 0-2: in waiting_here (stacky.py:6)" in logged
        # without the token: refused, and nothing printed
        bad = subprocess.run([sys.executable, ELASTIC, "stacks", "--rdzv-endpoint", endpoint, "--rdzv-id", "stacks",
                              "--timeout", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), timeout=60)
        assert bad.returncode == 1 and not bad.stdout, bad.stderr
    finally:
        for a in agents:
            a.stop()
        kill_all(pids)


def test_a_callable_worker_killed_by_the_file_timer_has_its_stack(tmp_path, monkeypatch):
    from agent_scripts import funcs
    from elastic import DefaultLogsSpecs, LocalElasticAgent, WorkerSpec
    monkeypatch.setenv("TORCHELASTIC_ENABLE_FILE_TIMER", "1")
    spec = WorkerSpec("hung", 1, funcs.hung_in_stuck_here, max_restarts=0)
    result = LocalElasticAgent(spec, logs_specs=DefaultLogsSpecs(log_dir=str(tmp_path / "logs"))).run()
    (failure,) = result.failures.values()
    assert failure.exitcode == -signal.SIGKILL
    assert "in stuck_here (funcs.py:" in failure.message
    assert "in stuck_here" in failure.stack and "in hung_in_stuck_here" in failure.stack


def test_a_stop_signal_on_one_simulated_host_stops_every_host(tmp_path):
    """The same on 3 network-namespace hosts: SIGTERM to host 1's agent; every worker gets SIGTERM,
    host 2's worker ignores it and dies after host 2's grace, every agent exits 143."""
    import subprocess
    from conftest import need
    from agent_scripts.harness import ELASTIC
    from netns import Network, netns_problem
    problem = netns_problem()
    need(problem is None, problem or "")
    script = _script(tmp_path, "recorder.py", RECORDER)
    out = tmp_path / "out"
    out.mkdir()
    conf = "last_call_timeout=1,heartbeat_interval=0.2,heartbeat_timeout=5,join_timeout=60"
    with Network(3) as net:
        agents = []
        try:
            for i in range(3):
                argv = [sys.executable, ELASTIC, "--nnodes", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                        net.addr(0) + ":29400", "--rdzv-id", "netstop", "--rdzv-conf", conf, "--local-addr",
                        net.addr(i), "--monitor-interval", "0.05", "--max-restarts", "0", "--shutdown-timeout",
                        "1", script]
                with open(str(tmp_path / ("agent%d.log" % i)), "wb") as log:
                    agents.append(net.popen(i, argv, stdout=log, stderr=subprocess.STDOUT,
                                            env=env(OUT=out, DEAF_RANK=2)))
            logs = lambda: "\n".join(  # noqa: E731
                "agent %d:\n%s" % (i, (tmp_path / ("agent%d.log" % i)).read_text()[-2000:]) for i in range(3))
            wait_for(lambda: len(pid_files(out)) == 3, what="3 workers to run", explain=logs)
            with open(os.path.join(str(out), "pid_2")) as f:
                deaf = int(f.read())
            os.kill(agents[1].pid, signal.SIGTERM)
            for a in agents:
                assert a.wait(60) == 128 + signal.SIGTERM, logs()
            for rank in range(3):
                assert os.path.exists(os.path.join(str(out), "got_%d_SIGTERM" % rank)), logs()
            assert not alive(deaf)
            assert "outlived the 1 s grace period" in logs()
        finally:
            for a in agents:
                if a.poll() is None:
                    a.kill()
                a.wait()


def test_stacks_and_the_job_wide_stop_on_etcd(tmp_path, etcd_binary):
    import subprocess
    from agent_scripts.harness import ELASTIC
    from etcd_cluster import EtcdCluster
    script = _script(tmp_path, "stacky.py", STACKY)
    out = tmp_path / "out"
    out.mkdir()
    with EtcdCluster(etcd_binary, tmp_path, size=1) as cluster:
        agents, endpoint = _nodes(tmp_path, "etcdjob", script, 2, env(OUT=out), ["--nproc-per-node", "2"],
                                  etcd=cluster.endpoints[0])
        pids = []
        try:
            logs = lambda: "\n".join("agent %d:\n%s" % (i, a.err()[-2000:]) for i, a in enumerate(agents))  # noqa: E731
            pids = wait_for(lambda: len(pid_files(out)) == 4 and pid_files(out), what="4 workers to run",
                            explain=logs)
            cmd = subprocess.run([sys.executable, ELASTIC, "stacks", "--rdzv-backend", "etcd", "--rdzv-endpoint",
                                  endpoint, "--rdzv-id", "etcdjob"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=env(), timeout=60)
            heads = [line for line in cmd.stdout.decode().split("\n") if line.startswith("rank")]
            assert heads == ["ranks 0-2: in waiting_here (stacky.py:6)",
                             "rank 3: in odd_one_out (stacky.py:10)"], cmd.stderr.decode()
            os.kill(agents[0].pid, signal.SIGTERM)
            for a in agents:
                assert a.wait(60) == 128 + signal.SIGTERM, logs()
        finally:
            for a in agents:
                a.stop()
            kill_all(pids)


@pytest.mark.parametrize("environ, says", [
    ({"ELASTICRUN_STACK_SIGNAL": "SIGKILL"}, "ELASTICRUN_STACK_SIGNAL='SIGKILL' is not a signal"),
    ({"ELASTICRUN_STACK_SIGNAL": "nonsense"}, "ELASTICRUN_STACK_SIGNAL='nonsense' is not a signal"),
    ({"ELASTICRUN_STACK_SIGNAL": "SIGUSR1"}, "the stack signal SIGUSR1 is also a signal to forward"),
    ({"ELASTICRUN_FORWARD_SIGNALS": "SIGBOGUS"}, "ELASTICRUN_FORWARD_SIGNALS='SIGBOGUS'"),
])
def test_a_bad_signal_setting_exits_2_naming_it(tmp_path, environ, says):
    import subprocess
    from agent_scripts.harness import ELASTIC
    script = _script(tmp_path, "ok.py", "pass\n")
    run = subprocess.run([sys.executable, ELASTIC, "--standalone", script], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env(**environ), timeout=60)
    assert run.returncode == 2 and says in run.stderr.decode(), run.stderr.decode()


def test_the_stack_signal_can_be_moved_or_turned_off(tmp_path):
    """ELASTICRUN_STACK_SIGNAL=SIGRTMIN+2 is the one workers arm; off: workers get no stack file."""
    import subprocess
    from agent_scripts.harness import ELASTIC
    script = _script(tmp_path, "env.py", "import os; print('SIG=%s FILE=%s' % (os.environ.get("
                                         "'ELASTICRUN_STACK_SIGNAL'), os.environ.get('ELASTICRUN_STACK_FILE')))\n")
    for value, expected in (("SIGRTMIN+2", "SIG=%d " % (signal.SIGRTMIN + 2)), ("off", "FILE=None")):
        run = subprocess.run([sys.executable, ELASTIC, "--standalone", script], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env(ELASTICRUN_STACK_SIGNAL=value), timeout=60)
        assert run.returncode == 0 and expected in run.stdout.decode(), run.stdout.decode() + run.stderr.decode()


# rank 0 fails once rank 1 is ready; rank 1 ignores SIGTERM inside stuck_here()
FAIL_WITH_A_DEAF_PEER = r"""
import os, signal, sys, time
out = os.environ["OUT"]
if os.environ["RANK"] == "0":
    while not os.path.exists(os.path.join(out, "ready_1")):
        time.sleep(0.02)
    sys.exit(3)
signal.signal(signal.SIGTERM, signal.SIG_IGN)

def stuck_here():
    open(os.path.join(out, "ready_1"), "w").close()
    time.sleep(60)  # HANG

stuck_here()
"""


def test_the_failure_report_shows_a_peer_killed_after_the_grace_apart_with_its_stack(tmp_path):
    script = _script(tmp_path, "deafpeer.py", FAIL_WITH_A_DEAF_PEER)
    out = tmp_path / "out"
    out.mkdir()
    a = Launcher(["--standalone", "--nproc-per-node", "2", "--max-restarts", "0", "--shutdown-timeout", "0.5",
                  script], tmp_path, environ=env(OUT=out))
    try:
        assert a.wait(60) == 3, a.err()
        report = a.err()[a.err().index("=" * 72):]
        root, apart = report.split("Stopped by the agent, SIGKILLed after the grace period (not failures):")
        assert "[rank 0]:" in root and "[rank 1]:" not in root, report
        assert "[rank 1]:" in apart and 'line %d in stuck_here' % _line(FAIL_WITH_A_DEAF_PEER) in apart, report
    finally:
        a.stop()
