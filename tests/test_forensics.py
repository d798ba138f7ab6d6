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
from agent_scripts.harness import ROOT, Launcher, alive, env, kill_all, wait_for  # noqa: E402

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
