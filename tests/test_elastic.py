"""LocalElasticAgent through its Python API: callable and program workers on one node (no rendezvous
handler: the agent's own single-node round), the error channel, and the pieces of the CLI that need
no processes. Multi-agent runs are in test_launcher.py, process-tree cleanup in test_teardown.py."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import elastic
from elastic import (ChildFailedError, DefaultLogsSpecs, LocalElasticAgent, ProcessFailure, Std,
                     WorkerSpec, WorkerState)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from agent_scripts import funcs  # noqa: E402

SCRIPTS = os.path.join(HERE, "agent_scripts")


def run_agent(fn, nproc=2, args=(), max_restarts=0, start_method="spawn", **spec_kw):
    spec = WorkerSpec("trainer", nproc, fn, args=args, max_restarts=max_restarts,
                      monitor_interval=0.05, **spec_kw)
    agent = LocalElasticAgent(spec, start_method=start_method, shutdown_timeout=2)
    return agent, agent.run()


def test_happy_function():
    agent, result = run_agent(funcs.happy)
    assert result.state == WorkerState.SUCCEEDED
    assert not result.is_failed()
    assert result.return_values == {0: None, 1: None}
    assert result.failures == {}


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_return_values_by_global_rank(start_method):
    _, result = run_agent(funcs.rank_times, nproc=3, args=(10,), start_method=start_method)
    assert result.return_values == {0: 0, 1: 10, 2: 20}


def test_large_return_values_do_not_deadlock():
    size = 10 * 1024 * 1024
    _, result = run_agent(funcs.big_value, nproc=2, args=(size,))
    assert sorted(result.return_values) == [0, 1]
    for rank, value in result.return_values.items():
        assert len(value) == size and value[:1] == str(rank).encode()


def test_unreadable_return_value_is_a_reported_failure():
    _, result = run_agent(funcs.unreadable_on_rank_1, nproc=2)
    assert result.is_failed() and result.state == WorkerState.FAILED
    rank, root = result.root_cause
    assert rank == 1
    assert "could not be read" in root.message and "FileNotFoundError" in root.message
    assert root.launcher_exit_code() != 0


def test_function_workers_wait_until_every_rank_has_returned(tmp_path):
    _, result = run_agent(funcs.first_returns_early, nproc=2, args=(str(tmp_path / "pid0"),))
    assert result.return_values == {0: "returned", 1: "rank 0 held"}


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_function_worker_atexit_handlers_run(tmp_path, start_method):
    """Function workers leave without finalizing the interpreter (see _function_worker), but their
    own atexit handlers still run."""
    _, result = run_agent(funcs.registers_atexit, nproc=2, args=(str(tmp_path),), start_method=start_method)
    assert result.return_values == {0: "registered", 1: "registered"}
    assert sorted(os.listdir(str(tmp_path))) == ["atexit.0", "atexit.1"]


def test_env_present_and_correct(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    _, result = run_agent(funcs.env_dump, nproc=2, max_restarts=3)
    envs = result.return_values
    for rank in (0, 1):
        e = envs[rank]
        assert e["LOCAL_RANK"] == str(rank) and e["RANK"] == str(rank)
        assert e["ROLE_RANK"] == str(rank) and e["ROLE_NAME"] == "trainer"
        assert e["GROUP_RANK"] == "0" and e["GROUP_WORLD_SIZE"] == "1"
        assert e["LOCAL_WORLD_SIZE"] == "2" and e["WORLD_SIZE"] == "2" and e["ROLE_WORLD_SIZE"] == "2"
        assert e["TORCHELASTIC_RESTART_COUNT"] == "0" and e["TORCHELASTIC_MAX_RESTARTS"] == "3"
        assert e["TORCHELASTIC_USE_AGENT_STORE"] == "False"
        assert e["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert e["OMP_NUM_THREADS"] == "1"
        assert e["TORCHELASTIC_RUN_ID"]
        assert e["TORCHELASTIC_ERROR_FILE"].endswith(os.path.join(str(rank), "error.json"))
        assert e["MASTER_ADDR"] and int(e["MASTER_PORT"]) > 0
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]
    assert envs[0]["TORCHELASTIC_ERROR_FILE"] != envs[1]["TORCHELASTIC_ERROR_FILE"]


def test_nccl_async_error_handling_passes_through(monkeypatch):
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    _, result = run_agent(funcs.env_dump, nproc=1)
    assert result.return_values[0]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "0"
    assert result.return_values[0]["OMP_NUM_THREADS"] == "7"


def test_master_addr_and_port_override():
    _, result = run_agent(funcs.env_dump, nproc=2, master_addr="10.9.8.7", master_port=12345)
    for e in result.return_values.values():
        assert e["MASTER_ADDR"] == "10.9.8.7" and e["MASTER_PORT"] == "12345"


def test_sad_function_reports_error_file_and_root_cause():
    _, result = run_agent(funcs.sad, nproc=2)
    assert result.is_failed() and result.state == WorkerState.FAILED
    assert result.return_values == {}
    assert set(result.failures) <= {0, 1} and result.failures
    rank, root = result.root_cause
    assert root.exitcode == 1 and root.launcher_exit_code() == 1
    assert "RuntimeError: sad worker %d" % rank == root.message
    assert "raise RuntimeError" in root.traceback
    with open(root.error_file) as f:
        data = json.load(f)
    assert data["message"]["message"] == root.message
    assert int(data["message"]["extraInfo"]["timestamp"]) > 0


def test_bipolar_function_restarts_until_budget_spent():
    agent, result = run_agent(funcs.bipolar, nproc=2, max_restarts=2)
    assert result.is_failed()
    assert agent.restart_count == 2
    assert 0 in result.failures and 1 not in result.failures


def test_rank_restart_after_sigkilled_worker():
    agent, result = run_agent(funcs.kill_self_first_attempt, nproc=2, max_restarts=1)
    assert result.state == WorkerState.SUCCEEDED
    assert agent.restart_count == 1
    assert result.return_values == {0: (0, 1), 1: (1, 1)}


def test_program_worker_failure_captured_without_record(tmp_path):
    env_err = tmp_path / "launcher_error.json"
    cmd = elastic.python_command(os.path.join(SCRIPTS, "fail.py"))
    spec = WorkerSpec("default", 2, cmd[0], args=cmd[1:], max_restarts=0, monitor_interval=0.05)
    result = LocalElasticAgent(spec, shutdown_timeout=2,
                               logs_specs=DefaultLogsSpecs(log_dir=str(tmp_path))).run()
    assert result.is_failed()
    rank, root = result.root_cause
    assert rank == 0 and root.exitcode == 1
    assert root.message == "ValueError: bad value on rank 0"
    assert "compute()" in root.traceback and "<string>" not in root.traceback
    err = ChildFailedError("fail.py", result.failures)
    assert err.get_first_failure()[0] == 0
    elastic._copy_root_cause(err, str(env_err))
    data = json.loads(env_err.read_text())
    assert data["errorCode"] == 1 and data["message"]["message"] == root.message
    assert data["message"]["errorCode"] == 1             # where torchelastic writes it


def test_python_command_runs_alone_with_python_environment(tmp_path):
    """The argv from python_command runs outside the agent too, given python_environment(): the
    bootstrap records the uncaught exception and its traceback starts at the script."""
    import subprocess
    cmd = elastic.python_command(os.path.join(SCRIPTS, "fail.py"))
    env = elastic.python_environment(dict(os.environ, RANK="0", TORCHELASTIC_ERROR_FILE=str(tmp_path / "e.json")))
    proc = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, timeout=60)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "ValueError: bad value on rank 0" in err and "<string>" not in err
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["message"]["message"] == "ValueError: bad value on rank 0"


def test_logs_redirect_and_tee(tmp_path, capfd):
    cmd = elastic.python_command(os.path.join(SCRIPTS, "printer.py"))
    logs = DefaultLogsSpecs(log_dir=str(tmp_path), redirects=Std.ERR, tee={0: Std.OUT})
    spec = WorkerSpec("w", 2, cmd[0], args=cmd[1:], monitor_interval=0.05)
    result = LocalElasticAgent(spec, logs_specs=logs, shutdown_timeout=2,
                               log_line_prefix_template="<${role_name}|${rank}>").run()
    assert result.state == WorkerState.SUCCEEDED
    out, err = capfd.readouterr()
    assert "<w|0>out of rank 0" in out.splitlines()
    assert "out of rank 1" in out and "<w|1>" not in out       # rank 1 stdout: plain console
    assert "err of rank" not in err                             # stderr: files only
    attempt = os.path.join(logs.root_log_dir, "attempt_0")
    with open(os.path.join(attempt, "0", "stdout.log")) as f:
        assert f.read() == "out of rank 0\n"
    with open(os.path.join(attempt, "1", "stderr.log")) as f:
        assert f.read() == "err of rank 1\n"


def test_local_ranks_filter_hides_other_ranks(tmp_path, capfd):
    cmd = elastic.python_command(os.path.join(SCRIPTS, "printer.py"))
    logs = DefaultLogsSpecs(log_dir=str(tmp_path), tee=Std.ALL, local_ranks_filter={1})
    spec = WorkerSpec("default", 2, cmd[0], args=cmd[1:], monitor_interval=0.05)
    LocalElasticAgent(spec, logs_specs=logs, shutdown_timeout=2).run()
    out, err = capfd.readouterr()
    assert "[default1]:out of rank 1" in out and "[default1]:err of rank 1" in err
    assert "rank 0" not in out and "rank 0" not in err
    with open(os.path.join(logs.root_log_dir, "attempt_0", "0", "stdout.log")) as f:
        assert f.read() == "out of rank 0\n"


def test_log_pump_gives_up_on_a_console_that_takes_nothing(tmp_path, caplog):
    """A tee'd worker's output far beyond a full console pipe: stop() returns once the console has
    taken nothing for stall_timeout seconds (the launcher must exit), and warns."""
    import time
    path = tmp_path / "stdout.log"
    path.write_bytes(b"line\n" * 200000)  # 1 MB: many times a pipe buffer
    r, w = os.pipe()
    pump = elastic._LogPump(interval=0.01, stall_timeout=0.5)
    try:
        pump.add_tail(str(path), w, "<0>")
        pump.start()
        started = time.monotonic()
        pump.stop()
        assert time.monotonic() - started < 10
        assert "took no output" in caplog.text
    finally:
        os.close(r)      # the abandoned write fails (EPIPE) and the thread ends
        pump._thread.join(10)
        os.close(w)
    assert not pump._thread.is_alive()


def test_tail_copies_whole_lines_only():
    tail = elastic._Tail("unused", 1, "<1>")
    assert tail.lines(b"a\nb") == b"<1>a\n"
    assert tail.lines(b"c\nd") == b"<1>bc\n"
    assert tail.lines(b"", final=True) == b"<1>d\n"
    long = b"x" * (tail._MAX_PARTIAL + 1)
    assert tail.lines(long) == b"<1>" + long + b"\n"   # cut, not hoarded


def test_std_maps_take_any_number_of_digits():
    assert Std.from_str("3") == Std.ALL
    assert Std.from_str("0:3,12:1,123:2") == {0: 3, 12: 1, 123: 2}
    for bad in ("4", "x", "0:5", "a:1", "1:"):
        with pytest.raises(ValueError):
            Std.from_str(bad)


def test_first_failure_is_earliest_then_lowest_rank():
    a = ProcessFailure(0, 10, 1, exit_time=100.5, rank=3)
    b = ProcessFailure(1, 11, -9, exit_time=100.2, rank=7)
    c = ProcessFailure(2, 12, 2, exit_time=100.2, rank=5)
    err = ChildFailedError("job", {3: a, 7: b, 5: c})
    assert err.get_first_failure() == (5, c)
    assert b.launcher_exit_code() == 128 + 9 and "SIGKILL" in b.message
    report = err.format_msg()
    assert report.index("[rank 5]") < report.index("[rank 7]") < report.index("[rank 3]")


def test_record_writes_error_file_atomically(tmp_path, monkeypatch):
    path = tmp_path / "err.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))

    @elastic.record
    def boom():
        raise KeyError("k")

    with pytest.raises(KeyError):
        boom()
    data = json.loads(path.read_text())
    assert data["message"]["message"] == "KeyError: 'k'"
    assert "boom" in data["message"]["extraInfo"]["py_callstack"]
    assert os.listdir(str(tmp_path)) == ["err.json"]


@pytest.mark.parametrize("content", ['{"unknown_key": "unknown_value"}', '["message"]', '{"message": {"me'])
def test_process_failure_refuses_an_error_file_not_in_torchelastic_format(tmp_path, content):
    """As torchelastic's ProcessFailure: an error file that is there but unreadable as its JSON
    raises (the agent reports such workers anyway: see test_job_faults' hostile error files)."""
    path = tmp_path / "error.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="error file %s" % path):
        ProcessFailure(0, 997, 1, str(path))


def test_error_handler_dump_sets_the_child_exit_code(tmp_path, monkeypatch):
    child, ours = tmp_path / "child.json", tmp_path / "ours.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(child))
    elastic.get_error_handler().record_exception(ValueError("bad"))
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(ours))
    elastic.ErrorHandler().dump_error_file(str(child), -11)
    data = json.loads(ours.read_text())
    assert data["message"]["message"] == "ValueError: bad" and data["message"]["errorCode"] == -11
    child.write_text('{"message": "plain text", "timestamp": 10}')   # left as it is: no message object
    elastic.ErrorHandler().dump_error_file(str(child), 3)
    assert json.loads(ours.read_text()) == {"message": "plain text", "timestamp": 10}
    assert sorted(os.listdir(str(tmp_path))) == ["child.json", "ours.json"]   # no temp file left


def test_error_handler_initialize_makes_a_fatal_signal_print_python_stacks():
    code = ("import os, signal, elastic\n"
            "elastic.ErrorHandler().initialize()\n"
            "def crash_site():\n"
            "    os.kill(os.getpid(), signal.SIGSEGV)\n"
            "crash_site()\n")
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)),
                       stderr=subprocess.PIPE, timeout=60)
    assert p.returncode == -signal.SIGSEGV
    assert b"Fatal Python error" in p.stderr and b"crash_site" in p.stderr, p.stderr


def test_spec_validation():
    with pytest.raises(ValueError):
        WorkerSpec("r", 0, funcs.happy)
    with pytest.raises(ValueError):
        WorkerSpec("r", 1, 42)
    with pytest.raises(ValueError):
        LocalElasticAgent(WorkerSpec("r", 1, funcs.happy), start_method="thread")


PRINTER = os.path.join(SCRIPTS, "printer.py")


@pytest.mark.parametrize("argv, needle", [
    (["--nnodes", "x", "s.py"], "--nnodes"),
    (["--nproc-per-node", "zero", "s.py"], "--nproc-per-node"),
    (["--redirects", "9", "s.py"], "--redirects"),
    (["--tee", "0:7", "s.py"], "--tee"),
    (["--bogus", "s.py"], "--bogus"),
    (["--rdzv-backend", "zk", "s.py"], "--rdzv-backend"),
    (["--signals-to-handle", "SIGNOPE", "s.py"], "--signals-to-handle"),
    (["--start-method", "thread", "s.py"], "--start-method"),
    (["--max-restarts", "many", "s.py"], "--max-restarts"),
    (["--monitor-interval", "nan", "s.py"], "--monitor-interval"),
    (["--monitor-interval", "inf", "s.py"], "--monitor-interval"),
    (["--exit-barrier-timeout", "nan", "s.py"], "--exit-barrier-timeout"),
    (["--rdzv-backend", "c10d", "--rdzv-endpoint", "tcp://127.0.0.1:1", os.path.join(SCRIPTS, "printer.py")],
     "is not HOST[:PORT]"),
    ([], "training_script"),
    (["no/such/script.py"], "no such script"),
    (["--log-dir", "/proc/nope", os.path.join(SCRIPTS, "printer.py")], "--log-dir"),
    # numbers: negative, nan, inf and huge values never reach a wait or a loop
    (["--nnodes", "100000000000000000000", PRINTER], "--nnodes"),
    (["--nnodes", "1:100000000000000000000", PRINTER], "--nnodes"),
    (["--nproc-per-node", "99999999999", PRINTER], "--nproc-per-node"),
    (["--max-restarts", "-1", PRINTER], "--max-restarts"),
    (["--max-restarts", "99999999999999999999", PRINTER], "--max-restarts"),
    (["--monitor-interval", "1e300", PRINTER], "--monitor-interval"),
    (["--shutdown-timeout", "inf", PRINTER], "--shutdown-timeout"),
    (["--shutdown-timeout", "1e300", PRINTER], "--shutdown-timeout"),
    (["--exit-barrier-timeout", "-1", PRINTER], "--exit-barrier-timeout"),
    (["--exit-barrier-timeout", "1e300", PRINTER], "--exit-barrier-timeout"),
    (["--standalone", "--rdzv-conf", "join_timeout=1e300", PRINTER], "join_timeout"),
    (["--standalone", "--rdzv-conf", "heartbeat_timeout=inf", PRINTER], "heartbeat_timeout"),
    (["--standalone", "--rdzv-conf", "read_timeout=nan", PRINTER], "read_timeout"),
    (["--standalone", "--rdzv-conf", "close_timeout=-1", PRINTER], "close_timeout"),
    # run ids are data: ones no encoding makes usable are refused, naming the rule
    (["--rdzv-id", "x" * 300, PRINTER], "--rdzv-id is 300 characters long: at most 255"),
    (["--rdzv-id", "a\nb", PRINTER], "control characters"),
    (["--rdzv-id", "", PRINTER], "--rdzv-id must not be empty"),
    # --no-python: the program must be one exec can start
    (["--no-python", "no-such-program-anywhere"], "--no-python: no such program"),
    (["--no-python", "/no/such/program"], "--no-python: no such program"),
    (["--no-python", PRINTER], "--no-python: %s is not an executable file" % PRINTER),
    (["--no-python", SCRIPTS], "is not an executable file"),
])
def test_cli_errors_exit_2_with_one_line(argv, needle, capsys):
    assert elastic.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and err.startswith("elasticrun: error:")


def test_cli_reads_pet_environment_and_both_spellings():
    env = {"PET_NPROC_PER_NODE": "3", "PET_MAX_RESTARTS": "2", "PET_STANDALONE": "1"}
    script = os.path.join(SCRIPTS, "printer.py")
    args = elastic._parse_args(["--monitor_interval", "0.5", "--rdzv-id=abc", script, "-x"], env)
    before = dict(vars(args))
    c = elastic._config_from_args(args, env)
    assert vars(args) == before     # the parsed options are read, never changed
    assert c.nproc == 3 and c.max_restarts == 2 and c.monitor_interval == 0.5
    assert c.rdzv.backend == "c10d" and c.rdzv.is_host and c.rdzv.local_addr == "127.0.0.1"
    assert (c.mode, c.script, c.script_args) == ("script", script, ["-x"])
    assert elastic._parse_nproc("cpu", {}) == len(os.sched_getaffinity(0))
    assert elastic._parse_nproc("auto", {}) >= 1
    assert elastic._config_from_args(elastic._parse_args([script], {}), {}).rdzv.backend == "static"


def test_cli_error_for_bad_pet_value(capsys):
    old = os.environ.get("PET_MAX_RESTARTS")
    os.environ["PET_MAX_RESTARTS"] = "lots"
    try:
        assert elastic.main(["s.py"]) == 2
    finally:
        if old is None:
            del os.environ["PET_MAX_RESTARTS"]
        else:
            os.environ["PET_MAX_RESTARTS"] = old
    assert "PET_MAX_RESTARTS" in capsys.readouterr().err


def test_signal_names_in_failures():
    f = ProcessFailure(0, 5, -signal.SIGTERM)
    assert f.signal_name() == "SIGTERM" and f.launcher_exit_code() == 143


@pytest.mark.parametrize("stamp", [10, "10"])
def test_error_file_other_layout_keeps_its_timestamp(tmp_path, stamp):
    path = tmp_path / "error.json"
    path.write_text(json.dumps({"message": "test error message", "timestamp": stamp}))
    f = ProcessFailure(0, 997, 1, str(path))
    assert f.message == "test error message" and f.timestamp == 10


def test_missing_signal_and_error_file_read_not_available(tmp_path):
    f = ProcessFailure(0, 997, 138, str(tmp_path / "ignored.json"))
    assert f.signal_name() == "<N/A>" and f.error_file == "<N/A>"
    report = ChildFailedError("trainer", {0: f}).format_msg()
    assert "error_file: <N/A>" in report and "exitcode  : 138 (pid: 997)" in report
    killed = ProcessFailure(0, 997, -signal.SIGSEGV)
    assert killed.signal_name() == "SIGSEGV" and "(SIGSEGV)" in ChildFailedError("t", {0: killed}).format_msg()


def test_record_writes_no_launcher_error_file_when_the_child_left_none(tmp_path, monkeypatch):
    launcher_file = tmp_path / "launcher.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(launcher_file))

    @elastic.record
    def launch():
        raise ChildFailedError("trainer", {0: ProcessFailure(0, 997, -signal.SIGKILL,
                                                             str(tmp_path / "missing.json"))})

    with pytest.raises(ChildFailedError):
        launch()
    assert not launcher_file.exists()


def test_record_enables_faulthandler(tmp_path):
    """A worker whose @record entrypoint dies of SIGSEGV prints its Python stack."""
    import subprocess
    script = tmp_path / "segv.py"
    script.write_text(textwrap.dedent("""
        import ctypes, sys
        sys.path.insert(0, %r)
        import elastic

        @elastic.record
        def crash_in_this_function():
            ctypes.string_at(0)

        crash_in_this_function()
        """ % os.path.dirname(HERE)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    proc = subprocess.run([sys.executable, str(script)], env=env, stderr=subprocess.PIPE, timeout=60)
    assert proc.returncode == -signal.SIGSEGV
    err = proc.stderr.decode()
    assert "Fatal Python error" in err and "crash_in_this_function" in err


# Every start path gives whole lines: 8 workers share the console and print 300 lines each, all at
# once (lines.py waits for every rank first; argv[2] is its meeting folder).
LINES = os.path.join(SCRIPTS, "lines.py")
API_RUNS = {
    "script through python_command": """
        cmd = elastic.python_command(sys.argv[1], ["300", sys.argv[2]])
        spec = elastic.WorkerSpec("w", 8, cmd[0], cmd[1:], monitor_interval=0.05)
        sys.exit(elastic.LocalElasticAgent(spec).run().is_failed())""",
    "callable": """
        sys.path.insert(0, os.path.dirname(sys.argv[1]))
        import lines
        spec = elastic.WorkerSpec("w", 8, lines.lines, ("300", sys.argv[2]), monitor_interval=0.05)
        sys.exit(elastic.LocalElasticAgent(spec).run().is_failed())""",
    "main([...])": """
        sys.exit(elastic.main(["--standalone", "--nproc-per-node", "8", sys.argv[1], "300", sys.argv[2]]))""",
}


@pytest.mark.parametrize("how", sorted(API_RUNS))
def test_console_gets_whole_lines_from_every_start_path(tmp_path, how):
    import re
    import subprocess
    code = "import os, sys\nimport elastic\n" + textwrap.dedent(API_RUNS[how])
    meet = tmp_path / "meet"
    meet.mkdir()
    # one pipe shared by every worker, as a console is
    p = subprocess.run([sys.executable, "-c", code, LINES, str(meet)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, cwd=str(tmp_path),
                       env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)), timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    lines = p.stdout.decode().splitlines()
    whole = re.compile(r"rank [0-7] line \d+ x{80}\Z")
    corrupted = [line for line in lines if not whole.match(line)]
    assert corrupted == [] and len(lines) == 8 * 300, (len(corrupted), corrupted[:3])


def test_every_state_is_reachable_through_the_transition_table():
    states = {value for name, value in vars(WorkerState).items() if name.isupper()}
    assert set(elastic._TRANSITIONS) == states
    seen, todo = set(), [WorkerState.UNKNOWN]
    while todo:
        state = todo.pop()
        if state not in seen:
            seen.add(state)
            todo.extend(elastic._TRANSITIONS[state])
    assert seen == states
    agent = LocalElasticAgent(WorkerSpec("r", 1, funcs.happy, monitor_interval=0.05))
    assert agent.state == WorkerState.UNKNOWN     # built, not run
    assert agent.run().state == agent.state == WorkerState.SUCCEEDED


def test_a_program_that_cannot_start_raises_its_own_error(tmp_path):
    spec = WorkerSpec("r", 2, str(tmp_path / "no-such-program"), monitor_interval=0.05)
    with pytest.raises(FileNotFoundError):
        LocalElasticAgent(spec, shutdown_timeout=2).run()


NPROC = "import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); import elastic; " \
        "print(elastic._parse_nproc(sys.argv[1], os.environ))"


def _nproc_in_child(value, path, cuda_visible=None):
    import subprocess
    env = dict(os.environ, PATH=path, PYTHONPATH=os.path.dirname(os.path.abspath(elastic.__file__)))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible
    run = subprocess.run([sys.executable, "-c", NPROC, value], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    return int(run.stdout)


def test_nproc_cpu_counts_the_affinity_mask_and_gpu_honours_cuda_visible_devices(tmp_path):
    # one CPU allowed: cpu and auto (no GPU) count 1, as torch does, on any machine
    bare = str(tmp_path / "none")
    assert _nproc_in_child("cpu", bare) == 1
    assert _nproc_in_child("auto", bare) == 1
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\n" + "".join(
        "echo 'GPU %d: Fake (UUID: GPU-%d0000000-aaaa)'\n" % (i, i) for i in range(4)))
    smi.chmod(0o755)
    path = str(smi.parent)
    assert _nproc_in_child("gpu", path) == 4
    assert _nproc_in_child("auto", path, "1,3") == 2
    assert _nproc_in_child("gpu", path, "GPU-20000000,0") == 2    # UUID prefixes, as CUDA takes them
    assert _nproc_in_child("gpu", path, "2,7,1") == 1             # read up to the first bad entry
    assert _nproc_in_child("auto", path, "") == 1                 # no GPU visible: the CPUs


def _fake_sysfs(root, nodes, threads=2, cores_per_cache=2):
    """sysfs as a NUMA machine shows it: `nodes` is [(package, n physical cores)]; each core has
    `threads` hyperthreads (CPUs numbered core by core), `cores_per_cache` cores share a last-level cache."""
    cpu = 0
    for node, (package, cores) in enumerate(nodes):
        first = cpu
        for core in range(cores):
            siblings = list(range(cpu, cpu + threads))
            cache_first = first + (core // cores_per_cache) * cores_per_cache * threads
            for c in siblings:
                top = root / "cpu" / ("cpu%d" % c) / "topology"
                top.mkdir(parents=True)
                (top / "physical_package_id").write_text("%d\n" % package)
                (top / "thread_siblings_list").write_text("%d-%d\n" % (siblings[0], siblings[-1]))
                for index, level, shared in ((0, 1, "%d-%d" % (siblings[0], siblings[-1])),
                                             (3, 3, "%d-%d" % (cache_first,
                                                               cache_first + cores_per_cache * threads - 1))):
                    d = root / "cpu" / ("cpu%d" % c) / "cache" / ("index%d" % index)
                    d.mkdir(parents=True)
                    (d / "level").write_text("%d\n" % level)
                    (d / "shared_cpu_list").write_text(shared + "\n")
            cpu += threads
        n = root / "node" / ("node%d" % node)
        n.mkdir(parents=True)
        (n / "cpulist").write_text("%d-%d\n" % (first, cpu - 1))
    return cpu


def test_numa_plan_binds_as_each_mode_says(tmp_path):
    # two packages, package 0 with NUMA nodes 0 and 1 (4 cores each), package 1 with node 2
    n = _fake_sysfs(tmp_path, [(0, 4), (0, 4), (1, 4)])
    topo = elastic._CpuTopology(str(tmp_path), allowed=range(n))
    assert topo.nodes == {0: list(range(0, 8)), 1: list(range(8, 16)), 2: list(range(16, 24))}
    node = elastic._numa_plan("node", 3, topo)
    assert node == [set(range(0, 8)), set(range(8, 16)), set(range(16, 24))]
    # GPUs say where: local rank r goes to the r-th GPU's node
    assert elastic._numa_plan("node", 2, topo, gpu_nodes=[2, 2]) == [set(range(16, 24))] * 2
    assert elastic._numa_plan("socket", 2, topo, gpu_nodes=[1, 2]) == [set(range(0, 16)), set(range(16, 24))]
    # exclusive: the node's physical cores (with their hyperthreads) split among its workers
    excl = elastic._numa_plan("exclusive", 4, topo, gpu_nodes=[0, 0, 0, 0])
    assert excl == [{0, 1}, {2, 3}, {4, 5}, {6, 7}]
    assert elastic._numa_plan("exclusive", 2, topo, gpu_nodes=[0, 0]) == [set(range(0, 4)), set(range(4, 8))]
    # core-complex: one last-level-cache group each, in turn
    cc = elastic._numa_plan("core-complex", 3, topo, gpu_nodes=[0, 0, 0])
    assert cc == [set(range(0, 4)), set(range(4, 8)), set(range(0, 4))]
    # CPUs outside the affinity mask are never handed out; without GPUs ranks spread in blocks
    topo = elastic._CpuTopology(str(tmp_path), allowed=set(range(2, 12)))
    assert elastic._numa_plan("node", 2, topo) == [set(range(2, 8)), set(range(8, 12))]


def test_no_numa_in_sysfs_is_one_node_of_every_allowed_cpu(tmp_path):
    topo = elastic._CpuTopology(str(tmp_path), allowed={0, 1, 2})
    assert elastic._numa_plan("exclusive", 3, topo) == [{0}, {1}, {2}]
    assert elastic._numa_plan("socket", 2, topo) == [{0, 1, 2}] * 2


def test_worker_spec_checks_the_numa_mode():
    with pytest.raises(ValueError, match="numa_binding must be one of node, socket, exclusive, core-complex"):
        WorkerSpec("r", 1, "prog", numa_binding="nodes")
