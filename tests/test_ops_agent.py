"""The file timer, /healthz and --slurm driven through real launchers (`python3 elastic.py ...`)."""
import http.client
import json
import os
import re
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from agent_scripts.harness import Launcher, env, wait_for  # noqa: E402
from ports import free_port  # noqa: E402

GUARD = 30  # seconds: hang guards only, never a claim about speed
FAST = ["--monitor-interval", "0.05"]

# Both scripts see the test's folder as argv[1] and talk to the test through files in it.
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

HEALTH = textwrap.dedent("""
    import os, signal, sys, time
    folder = sys.argv[1]
    rank, attempt = os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]

    def mark(name):
        open(os.path.join(folder, name), "w").close()

    def wait_file(name):
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(folder, name)) and time.monotonic() < deadline:
            time.sleep(0.01)

    if attempt == "0" and rank == "0":
        mark("a0-r0")
        wait_file("fail")
        sys.exit(3)
    elif attempt == "0":
        # holds the restart open (ignores the agent's SIGTERM) until the test has seen the 503
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        mark("a0-r1")
        wait_file("seen-503")
    else:
        mark("a1-r%s" % rank)
        wait_file("finish")
""")

RANKS = "import os\nprint('RANK=%s WORLD=%s RUN=%s' % (os.environ['RANK'], os.environ['WORLD_SIZE'], " \
        "os.environ['TORCHELASTIC_RUN_ID']), flush=True)\n"


def script(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def no_ops_env(**extra):
    e = env(**extra)
    for k in list(e):
        if k.startswith(("SLURM_", "PET_", "TORCHELASTIC_")):
            del e[k]
    e.update({k: str(v) for k, v in extra.items()})
    return e


def test_hung_worker_killed_group_restarted_sibling_left_alone(tmp_path):
    folder = tmp_path / "io"
    folder.mkdir()
    hang = script(tmp_path, "hang.py", HANG)
    a = Launcher(["--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--shutdown-timeout", "5"]
                 + FAST + [hang, str(folder)], tmp_path, environ=no_ops_env(TORCHELASTIC_ENABLE_FILE_TIMER=1))
    try:
        assert a.wait(GUARD) == 0, a.err()
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


def get_health(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD)
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), json.loads(resp.read())
    finally:
        conn.close()


def health_until(port, code, **fields):
    """Ask /healthz until it answers `code` with `fields` (the agent moves on its own schedule)."""
    def check():
        got = get_health(port)
        return got if got[0] == code and all(got[2].get(k) == v for k, v in fields.items()) else None
    return wait_for(check, GUARD, "/healthz %d %r" % (code, fields))


def test_healthz_200_while_running_503_while_restarting(tmp_path):
    folder = tmp_path / "io"
    folder.mkdir()
    health = script(tmp_path, "health.py", HEALTH)
    a = Launcher(["--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--health-check-port", "0",
                  "--shutdown-timeout", str(GUARD)] + FAST + [health, str(folder)], tmp_path,
                 environ=no_ops_env())
    try:
        m = wait_for(lambda: re.search(r"health check on http://0\.0\.0\.0:(\d+)/healthz", a.err()), GUARD,
                     "the health-check port in the log")
        port = int(m.group(1))
        wait_for(lambda: (folder / "a0-r0").exists() and (folder / "a0-r1").exists(), GUARD, "attempt 0")
        code, ctype, body = health_until(port, 200)
        assert ctype == "application/json"
        assert body["state"] == "HEALTHY" and body["restart_count"] == 0 and body["healthy"] is True
        assert body["group_rank"] == 0 and body["group_world_size"] == 1 and body["world_size"] == 2
        assert isinstance(body["last_progress_time"], float)

        (folder / "fail").touch()     # rank 0 exits 3; rank 1 holds the teardown open
        code, _, body = health_until(port, 503)
        assert body["state"] in ("UNHEALTHY", "INIT") and body["healthy"] is False
        (folder / "seen-503").touch()

        wait_for(lambda: (folder / "a1-r0").exists() and (folder / "a1-r1").exists(), GUARD, "attempt 1")
        code, _, body = health_until(port, 200, restart_count=1)
        assert body["state"] == "HEALTHY"
        (folder / "finish").touch()
        assert a.wait(GUARD) == 0, a.err()
        assert "restarting the worker group (1/1)" in a.err()
    finally:
        a.stop()


def srun_env(node_id, nodelist, **extra):
    return no_ops_env(SLURM_JOB_ID="4242", SLURM_STEP_ID="7", SLURM_NNODES="2", SLURM_STEP_NUM_NODES="2",
                      SLURM_NODEID=node_id, SLURM_JOB_NODELIST=nodelist, SLURM_STEP_NODELIST=nodelist,
                      SLURM_PROCID=node_id, **extra)


def test_slurm_two_nodes_explicit_endpoint_wins(tmp_path):
    ranks = script(tmp_path, "ranks.py", RANKS)
    # Slurm's own endpoint would be node1:29400; the explicit one wins, so no name is looked up
    args = ["--slurm", "--nproc-per-node", "2", "--rdzv-endpoint", "127.0.0.1:%d" % free_port(),
            "--rdzv-conf", "last_call_timeout=1,join_timeout=%d" % GUARD] + FAST + [ranks]
    nodes = []
    try:
        for node_id in ("0", "1"):
            nodes.append(Launcher(args, tmp_path, "node%s" % node_id, environ=srun_env(node_id, "node[1-2]")))
        seen = []
        for node in nodes:
            assert node.wait(GUARD) == 0, node.err()
            seen += re.findall(r"RANK=(\d) WORLD=(\d) RUN=(\S+)", node.out())
        assert sorted(seen) == [(str(r), "4", "4242.7") for r in range(4)]
    finally:
        for node in nodes:
            node.stop()


def test_slurm_multi_node_loopback_endpoint_refused(tmp_path):
    ranks = script(tmp_path, "ranks.py", RANKS)
    a = Launcher(["--slurm", ranks], tmp_path, environ=srun_env("0", "127.0.0.[1-2]"))
    try:
        assert a.wait(GUARD) == 2
        lines = a.err().splitlines()
        assert len(lines) == 1 and lines[0].startswith("elasticrun: error: --slurm:"), lines
        assert "127.0.0.1" in lines[0] and "rendezvous with itself" in lines[0]
        assert a.out() == ""
    finally:
        a.stop()
