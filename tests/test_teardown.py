"""No orphans: after a worker failure, a stop signal to the launcher, or SIGKILL of the launcher, no
process of the job is left, including grandchildren that ignore SIGTERM (checked in /proc)."""
import glob
import os
import signal
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from agent_scripts.harness import SCRIPTS, Launcher, alive, kill_all, wait_for  # noqa: E402

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
    pids = []
    extra = ["--run-path", "--start-method", "fork"] if mode == "run-path" else []
    a = Launcher(BASE + extra + [FORKER, str(tmp_path), "sleep"], tmp_path)
    try:
        pids = wait_for(job_pids(tmp_path), what="workers to start")
        os.kill(a.pid, signal.SIGKILL)
        a.wait()
        check_no_orphans(pids)
    finally:
        a.stop()
        kill_all(pids)
