"""Proof with real PyTorch (issue 7): unchanged DDP scripts, elastic recovery and scale-up, and
torch's own error-file and file-timer clients against our launcher.

The launcher runs under this test's Python and never imports torch; the workers run under the
separate torch interpreter (`torch_python` fixture), started with `--no-python TORCH_PYTHON script`.
Worker scripts live in tests/torch_scripts/ and write their results to files in tmp_path, which the
tests compare. Every launcher runs in its own session and is torn down in a `finally`.
"""
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from ports import free_port

ELASTIC = os.path.join(ROOT, "elastic.py")
SCRIPTS = os.path.join(ROOT, "tests", "torch_scripts")
HANG_GUARD = 150  # seconds; only catches hangs, never times anything

# Where FileTimerServer lives (it was in _ops_part.py before the merge into elastic.py).
TIMER_MODULE = "elastic"


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PET_", "TORCHELASTIC_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")  # a crash shows its stack
    env.update(extra)
    return env


class Launcher:
    """One `python3 elastic.py ...` process in its own session, output captured to files; `python`:
    the launcher's interpreter (the torch one for --run-path, whose workers are its children)."""

    def __init__(self, tmp_path, name, args, env=None, python=sys.executable):
        self.out_path = tmp_path / ("%s.out" % name)
        self.err_path = tmp_path / ("%s.err" % name)
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([python, ELASTIC] + list(args), stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, env=env or _env(), cwd=str(tmp_path),
                                         start_new_session=True)

    def wait(self, timeout=HANG_GUARD):
        return self.proc.wait(timeout)

    @property
    def stderr(self):
        return self.err_path.read_text(errors="replace")

    def kill(self):
        """Tear down: the launcher's grace period first, then its whole session."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Launchers(list):
    def start(self, *args, **kwargs):
        launcher = Launcher(*args, **kwargs)
        self.append(launcher)
        return launcher

    def kill_all(self):
        for launcher in self:
            launcher.kill()


@pytest.fixture
def launchers():
    started = Launchers()
    try:
        yield started
    finally:
        started.kill_all()


def _worker(torch_python, script, *args):
    return ["--no-python", torch_python, os.path.join(SCRIPTS, script)] + [str(a) for a in args]


def _results(out_dir, world):
    results = []
    for rank in range(world):
        with open(os.path.join(str(out_dir), "w%d.rank%d.json" % (world, rank))) as f:
            results.append(json.load(f))
    return results


def _wait_for_files(paths, proc, timeout=HANG_GUARD):
    """Wait until every path exists (the workers' progress) or the launcher exits; a hang guard only."""
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(str(p)) for p in paths):
        if proc.poll() is not None:
            pytest.fail("launcher exited with %s before %s appeared" % (proc.returncode, paths))
        if time.monotonic() > deadline:
            pytest.fail("hang guard: %s never appeared" % paths)
        time.sleep(0.05)


def _assert_same_training(results, world):
    assert [r["rank"] for r in results] == list(range(world))
    assert {r["world_size"] for r in results} == {world}
    first = results[0]
    for r in results[1:]:
        assert r["losses"] == first["losses"], "rank %d saw a different loss" % r["rank"]
        assert r["params"] == first["params"], "rank %d has different parameters" % r["rank"]
    assert {r["rank_sum"] for r in results} == {float(sum(range(world)))}


# ------------------------------------------------------------------------------ unchanged DDP


def test_ddp_one_node_four_workers(torch_python, launchers, tmp_path):
    out = tmp_path / "out"
    launcher = launchers.start(tmp_path, "agent", ["--standalone", "--nproc-per-node", "4"]
                               + _worker(torch_python, "ddp_train.py", "--out", out, "--steps", 4))
    assert launcher.wait() == 0, launcher.stderr
    results = _results(out, 4)
    _assert_same_training(results, 4)
    assert sorted(r["local_rank"] for r in results) == [0, 1, 2, 3]


def _c10d_args(port, run_id, nnodes, *conf):
    args = ["--nnodes", nnodes, "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "127.0.0.1:%d" % port, "--rdzv-id", run_id, "--local-addr", "127.0.0.1"]
    if conf:
        args += ["--rdzv-conf", ",".join(conf)]
    return args


def test_ddp_two_agents_two_workers_c10d(torch_python, launchers, tmp_path):
    out = tmp_path / "out"
    port = free_port()
    # one restart allowed: once in CI a gloo worker aborted ("terminate called without an active
    # exception", SIGABRT) on a loaded 2-core machine; the job must still finish
    # with identical results, which is what a restart gives a real user too
    args = (_c10d_args(port, "ddp-2x2", "2") + ["--max-restarts", "1"]
            + _worker(torch_python, "ddp_train.py", "--out", out, "--steps", 4))
    agents = [launchers.start(tmp_path, "agent%d" % i, args) for i in range(2)]
    for agent in agents:
        assert agent.wait() == 0, agent.stderr
    results = _results(out, 4)
    _assert_same_training(results, 4)
    # each agent ran two workers holding consecutive global ranks
    assert [r["local_rank"] for r in results] == [0, 1, 0, 1]


# ------------------------------------------------------------------------------ elastic recovery


def test_recovery_from_sigkill_matches_uninterrupted_run(torch_python, launchers, tmp_path):
    steps = ["--steps", 6]
    ref_out, ref_ckpt = tmp_path / "ref", tmp_path / "ref.pt"
    out, ckpt, marker = tmp_path / "out", tmp_path / "ckpt.pt", tmp_path / "killed"
    # both runs at once: they share nothing but the CPU
    ref = launchers.start(tmp_path, "ref", ["--standalone", "--nproc-per-node", "2"]
                          + _worker(torch_python, "ddp_train.py", "--out", ref_out, "--ckpt", ref_ckpt, *steps))
    run = launchers.start(tmp_path, "run", ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1"]
                          + _worker(torch_python, "ddp_train.py", "--out", out, "--ckpt", ckpt, *steps,
                                    "--die-at", 3, "--die-rank", 1, "--marker", marker))
    assert ref.wait() == 0, ref.stderr
    assert run.wait() == 0, run.stderr
    assert marker.exists(), "rank 1 never killed itself"

    expected, results = _results(ref_out, 2), _results(out, 2)
    _assert_same_training(results, 2)
    for r in results:
        assert r["restart_count"] == 1
        assert 0 < r["start_step"] <= 3, "did not resume from a checkpoint"
    assert results[0]["params"] == expected[0]["params"]
    resumed = {k: v for k, v in expected[0]["losses"].items() if int(k) >= results[0]["start_step"]}
    assert results[0]["losses"] == resumed


# ------------------------------------------------------------------------------ scale-up


def test_scale_up_second_agent_joins_running_job(torch_python, launchers, tmp_path):
    out = tmp_path / "out"
    port = free_port()
    args = (_c10d_args(port, "grow", "1:2", "last_call_timeout=1", "heartbeat_interval=0.5",
                       "heartbeat_timeout=30")
            + ["--max-restarts", "0"]
            + _worker(torch_python, "ddp_train.py", "--out", out, "--steps", 2, "--hold-below-world", 4,
                              "--hold-timeout", 60))
    first = launchers.start(tmp_path, "first", args)
    _wait_for_files([out / "w2.rank0.json", out / "w2.rank1.json"], first.proc)
    small = _results(out, 2)
    assert {r["rank_sum"] for r in small} == {1.0}

    second = launchers.start(tmp_path, "second", args)
    for agent in (first, second):
        assert agent.wait() == 0, agent.stderr
    results = _results(out, 4)
    _assert_same_training(results, 4)
    assert {r["rank_sum"] for r in results} == {6.0}  # all_reduce summed over 4 ranks
    # growing is not a failure: the restart budget (0) was not touched
    assert {r["restart_count"] for r in results} == {0}


# ------------------------------------------------------------------------------ interop


def test_torch_record_error_file_in_our_report(torch_python, launchers, tmp_path):
    # workers' own output goes to log files (--redirects 3): what the report shows came from the
    # error file torch's @record wrote
    launcher = launchers.start(tmp_path, "agent", ["--standalone", "--nproc-per-node", "2", "--redirects", "3",
                                                   "--log-dir", tmp_path / "logs"]
                               + _worker(torch_python, "record_fail.py", "--fail-rank", 1))
    assert launcher.wait() == 1, launcher.stderr  # the worker's own exit code (the re-raised exception)
    report = launcher.stderr
    assert "Root cause" in report, report
    root = report[report.index("Root cause"):]
    assert "rank 1" in root.splitlines()[1], root
    assert "ValueError: torch-record worker 1 gave up on purpose" in root
    assert "in explode" in root  # the traceback from torch's error file
    assert 'raise ValueError("torch-record worker %d gave up on purpose" % rank)' in root


def test_torch_file_timer_client_killed_by_our_server(torch_python, tmp_path):
    timer = importlib.import_module(TIMER_MODULE)
    pipe = str(tmp_path / "timer.pipe")
    server = timer.FileTimerServer(pipe, run_id="torch-interop", max_interval=0.1)
    server.start()
    procs = []
    try:
        for rank in range(2):
            procs.append(subprocess.Popen(
                [torch_python, os.path.join(SCRIPTS, "timer_hang.py"), "--out", str(tmp_path),
                 "--hang-rank", "0", "--after", "1"],
                env=_env(RANK=str(rank), TORCHELASTIC_TIMER_FILE=pipe), start_new_session=True))
        codes = [p.wait(HANG_GUARD) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        server.stop()
    assert codes == [-signal.SIGKILL, 0]
    assert (tmp_path / "rank0.entered").exists() and not (tmp_path / "rank0.woke").exists()
    assert (tmp_path / "rank1.done").exists()


def test_torch_file_timer_client_under_launcher(torch_python, launchers, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # one worker: a sibling could still be importing torch when the agent stops the group
    launcher = launchers.start(tmp_path, "agent", ["--standalone", "--nproc-per-node", "1"]
                               + _worker(torch_python, "timer_hang.py", "--out", out, "--hang-rank", 0,
                                         "--after", 1),
                               env=_env(TORCHELASTIC_ENABLE_FILE_TIMER="1"))
    assert launcher.wait() == 128 + signal.SIGKILL, launcher.stderr
    assert "SIGKILL" in launcher.stderr
    assert "scope step" in launcher.stderr  # the report names the scope that overran
    assert (out / "rank0.entered").exists() and not (out / "rank0.woke").exists()


# ------------------------------------------------------------------------------ function workers

@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_api_function_workers_return_tensors(torch_python, tmp_path, start_method):
    """torch pickles a tensor's storage as shared memory handed over by its worker process: the
    value arrives only if the worker stays until the agent has read it."""
    out = str(tmp_path / "values.json")
    proc = subprocess.Popen([torch_python, os.path.join(SCRIPTS, "tensor_agent.py"), ROOT, out, "2",
                             start_method], env=_env(), cwd=str(tmp_path), start_new_session=True)
    try:
        assert proc.wait(HANG_GUARD) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with open(out) as f:
        data = json.load(f)
    assert data["state"] == "SUCCEEDED" and data["failures"] == {}
    assert data["values"] == {"0": [0.0, 0.0, 1000], "1": [1.0, 1.0, 1000]}


def test_gloo_run_path_workers_exit_cleanly(torch_python, tmp_path):
    """A gloo job that ends without a barrier or destroy_process_group, under --run-path: no worker
    may abort as it leaves ("terminate called without an active exception", SIGABRT). Before the
    fix about 1 run in 4 did."""
    for i in range(5):
        launcher = Launcher(tmp_path, "gloo%d" % i, ["--standalone", "--nproc-per-node", "2", "--run-path",
                                                     os.path.join(SCRIPTS, "gloo_exit.py")],
                            python=torch_python)
        try:
            code = launcher.wait()
        finally:
            launcher.kill()
        assert code == 0 and "terminate called" not in launcher.stderr, launcher.stderr
