"""No orphans: after a worker failure, a stop signal to the launcher, or SIGKILL of the launcher, no
process of the job is left, including grandchildren that ignore SIGTERM (checked in /proc)."""
import glob
import os
import signal
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from agent_scripts.harness import SCRIPTS, Launcher, alive, env, kill_all, wait_for  # noqa: E402

FORKER = os.path.join(SCRIPTS, "forker.py")
BASE = ["--standalone", "--nproc-per-node", "2", "--monitor-interval", "0.05", "--shutdown-timeout", "0.5"]


def job_pids(out, nranks=2):
    def read():
        files = glob.glob(os.path.join(str(out), "pids_*[0-9]"))
        if len(files) < nranks:
            return None
        pids = []
        for path in files:
            with open(path) as f:
                pids += [int(p) for p in f.read().split()]
        return pids
    return read


def check_no_orphans(pids):
    wait_for(lambda: not any(alive(p) for p in pids), 15, "every job process to be gone")


def test_no_orphans_after_worker_failure_and_restart(tmp_path):
    pids = []
    a = Launcher(BASE + ["--max-restarts", "1", FORKER, str(tmp_path), "fail"], tmp_path)
    try:
        assert a.wait() == 3, a.err()
        pids = job_pids(tmp_path, 4)()
        assert len(pids) == 12                     # 2 attempts x 2 workers x (worker + 2 grandchildren)
        assert not [p for p in pids if alive(p)]   # the launcher reaped and killed before exiting
    finally:
        a.stop()
        kill_all(pids)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_tears_down_and_exits_128_plus_n(tmp_path, sig):
    pids = []
    a = Launcher(BASE + [FORKER, str(tmp_path), "sleep"], tmp_path)
    try:
        pids = wait_for(job_pids(tmp_path), what="workers to start")
        os.kill(a.pid, sig)
        assert a.wait() == 128 + sig, a.err()
        assert not [p for p in pids if alive(p)]
        assert signal.Signals(sig).name in a.err()
    finally:
        a.stop()
        kill_all(pids)


@pytest.mark.parametrize("mode", ["program", "run-path"])
def test_no_orphans_after_launcher_sigkill(tmp_path, mode):
    extra = ["--run-path", "--start-method", "fork"] if mode == "run-path" else []
    sigkill_launcher_then_check(Launcher(BASE + extra + [FORKER, str(tmp_path), "sleep"], tmp_path), tmp_path)


def sigkill_launcher_then_check(a, out):
    """SIGKILL launcher `a` once the processes its workers record in `out` run: none may survive."""
    pids = []
    try:
        pids = wait_for(job_pids(out), what="workers (and what they start) to run")
        os.kill(a.pid, signal.SIGKILL)
        a.wait()
        check_no_orphans(pids)
    finally:
        a.stop()
        kill_all(pids)


# A worker's descendant that left the worker's session (a daemon, `setsid cmd &`, start_new_session)
# gets no group signal; the agent finds it by the mark in its environment.

DAEMONISER = os.path.join(SCRIPTS, "daemoniser.py")
WORKER_KINDS = {   # the options before the script that start each kind of worker
    "fork-server": [],
    "program": ["--no-python", sys.executable],
    "run-path": ["--run-path", "--start-method", "fork"],
}


def daemonising_job(tmp_path, name="agent", kind="fork-server"):
    out = tmp_path / name
    out.mkdir()
    launcher = Launcher(BASE + WORKER_KINDS[kind] + [DAEMONISER, str(out)], tmp_path, name)
    return launcher, out


def test_stop_signal_kills_workers_descendants_in_their_own_sessions(tmp_path):
    pids = []
    a, out = daemonising_job(tmp_path)
    try:
        pids = wait_for(job_pids(out), what="workers and their daemons to start")
        os.kill(a.pid, signal.SIGTERM)
        assert a.wait() == 128 + signal.SIGTERM, a.err()
        assert not [p for p in pids if alive(p)]
        # the grace period holds for them too: SIGTERM first (the daemon ignores it: then SIGKILL)
        assert len(glob.glob(os.path.join(str(out), "session_*.term"))) == 2
    finally:
        a.stop()
        kill_all(pids)


@pytest.mark.parametrize("kind", sorted(WORKER_KINDS))
def test_launcher_sigkill_kills_workers_descendants_in_their_own_sessions(tmp_path, kind):
    sigkill_launcher_then_check(*daemonising_job(tmp_path, kind=kind))


def test_teardown_spares_other_launchers_workers_and_unrelated_processes(tmp_path):
    import subprocess
    pids_a, pids_b, bystander = [], [], None
    a, out_a = daemonising_job(tmp_path, "a")
    b, out_b = daemonising_job(tmp_path, "b")
    try:
        bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"],
                                     start_new_session=True)
        pids_a = wait_for(job_pids(out_a), what="a's workers and daemons to start")
        pids_b = wait_for(job_pids(out_b), what="b's workers and daemons to start")
        os.kill(a.pid, signal.SIGTERM)
        assert a.wait() == 128 + signal.SIGTERM, a.err()
        assert not [p for p in pids_a if alive(p)]
        assert all(alive(p) for p in pids_b) and bystander.poll() is None
        os.kill(b.pid, signal.SIGKILL)   # and the other one's reaper spares the bystander too
        b.wait()
        check_no_orphans(pids_b)
        assert bystander.poll() is None
    finally:
        a.stop()
        b.stop()
        kill_all(pids_a + pids_b)
        if bystander is not None:
            bystander.kill()
            bystander.wait()


def test_environment_mark_matches_whole_tokens_only():
    import elastic
    block = b"A=1\0ELASTICRUN_TREE=outer-1:inner-2\0B=inner-3"
    assert elastic._carries_mark(block, b"outer-1") and elastic._carries_mark(block, b"inner-2")
    assert not elastic._carries_mark(block, b"inner-3")    # elsewhere in the environment
    assert not elastic._carries_mark(block, b"inner-")     # a prefix of a token
    assert not elastic._carries_mark(b"X=1", b"inner-2")
    assert elastic._tree_mark("me", None) == "me" and elastic._tree_mark("me", "up") == "up:me"


def test_launcher_sigkill_kills_the_daemons_of_a_launcher_it_runs(tmp_path):
    # the inner launcher's workers carry both tokens: the outer reaper finds them even if it kills
    # the inner reaper first
    from agent_scripts.harness import ELASTIC
    out = tmp_path / "inner"
    out.mkdir()
    sigkill_launcher_then_check(
        Launcher(["--standalone", "--no-python", sys.executable, ELASTIC] + BASE + [DAEMONISER, str(out)],
                 tmp_path), out)


# A worker that forks without exec, calls setsid and forks again leaves a daemon in no worker group.
# A script worker's daemon (a new interpreter, the default) has the worker's exec'd environment,
# mark included; a forked one's environment is the launcher's: only the subreaper (the fork server,
# or the launcher for --run-path) still has it below itself.
NOFORK = os.path.join(SCRIPTS, "nofork_daemon.py")


@pytest.mark.parametrize("mode", ["script", "fork-server", "run-path"])
def test_no_orphans_from_workers_that_fork_without_exec(tmp_path, mode):
    extra = ["--run-path", "--start-method", "fork"] if mode == "run-path" else []
    environ = env(ELASTICRUN_FORKSERVER="1") if mode == "fork-server" else None
    pids = []
    a = Launcher(BASE + extra + ["--max-restarts", "1", NOFORK, str(tmp_path), "fail"], tmp_path,
                 environ=environ)
    try:
        assert a.wait() == 3, a.err()
        pids = job_pids(tmp_path, 4)()
        assert len(pids) == 8                      # 2 attempts x 2 workers x (worker + daemon)
        assert not [p for p in pids if alive(p)]   # the launcher killed them before exiting
    finally:
        a.stop()
        kill_all(pids)


@pytest.mark.parametrize("mode", ["script", "fork-server"])
def test_no_orphans_from_workers_that_fork_without_exec_after_launcher_sigkill(tmp_path, mode):
    environ = env(ELASTICRUN_FORKSERVER="1") if mode == "fork-server" else None
    sigkill_launcher_then_check(Launcher(BASE + [NOFORK, str(tmp_path), "sleep"], tmp_path, environ=environ),
                                tmp_path)
