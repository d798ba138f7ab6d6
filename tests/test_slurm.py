"""--slurm: Slurm's compressed host lists and srun's environment turned into launcher options."""
import os
import re
import sys

import pytest

import elastic as ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from agent_scripts.harness import Launcher, clean_env, write_script  # noqa: E402
from ports import free_port  # noqa: E402

GUARD = 30  # seconds: hang guards only, never a claim about speed
FAST = ["--monitor-interval", "0.05"]


@pytest.mark.parametrize("text, hosts", [
    ("", []),
    ("node1", ["node1"]),
    ("node1,node2", ["node1", "node2"]),
    ("gpu[001-004,010],cpu7", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010", "cpu7"]),
    ("a[1-2]-b[3-4]", ["a1-b3", "a1-b4", "a2-b3", "a2-b4"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("n[7]", ["n7"]),
    ("rack[1-2]n[01-02],login", ["rack1n01", "rack1n02", "rack2n01", "rack2n02", "login"]),
    ("10.1.2.[3-4]", ["10.1.2.3", "10.1.2.4"]),
    ("x[1,3-4]y,z[0-1]", ["x1y", "x3y", "x4y", "z0", "z1"]),
    (" h1 , h2 ", ["h1", "h2"]),
])
def test_parse_hostlist(text, hosts):
    assert ops._parse_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["n[1-2", "n1-2]", "n[[1]]", "n[a-b]", "n[4-2]", "a,,b", "n[]", "n[1-]"])
def test_parse_hostlist_rejects(text):
    with pytest.raises(ValueError, match="host list"):
        ops._parse_hostlist(text)


def srun_env(**extra):
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NNODES": "2", "SLURM_STEP_NUM_NODES": "2",
           "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "10.1.2.[3-4]", "SLURM_STEP_NODELIST": "10.1.2.[3-4]",
           "SLURM_PROCID": "1"}
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def test_two_node_srun():
    assert ops._slurm_options(srun_env()) == {
        "nnodes": "2", "node_rank": 1, "rdzv_endpoint": "10.1.2.3:29400", "rdzv_id": "4242.0",
        "rdzv_backend": "c10d"}


def test_step_values_win_over_job_values():
    opts = ops._slurm_options(srun_env(SLURM_NNODES="8", SLURM_JOB_NODELIST="gpu[01-08]",
                                       SLURM_STEP_NODELIST="gpu[05-06]", SLURM_STEP_ID="3"))
    assert (opts["nnodes"], opts["rdzv_endpoint"], opts["rdzv_id"]) == ("2", "gpu05:29400", "4242.3")


def test_job_values_when_step_values_missing():
    opts = ops._slurm_options(srun_env(SLURM_STEP_NUM_NODES=None, SLURM_STEP_NODELIST=None,
                                       SLURM_NNODES="3", SLURM_JOB_NODELIST="cn[7-9]", SLURM_NODEID="2"))
    assert (opts["nnodes"], opts["node_rank"], opts["rdzv_endpoint"]) == ("3", 2, "cn7:29400")


def test_single_node_batch_script_without_step():
    opts = ops._slurm_options({"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
                               "SLURM_JOB_NODELIST": "localhost"})
    assert opts == {"nnodes": "1", "node_rank": 0, "rdzv_endpoint": "localhost:29400", "rdzv_id": "7",
                    "rdzv_backend": "c10d"}


@pytest.mark.parametrize("nodelist", ["127.0.0.[1-2]", "127.0.0.1,127.0.0.2", "localhost,node2", "::1"])
def test_multi_node_loopback_endpoint_refused(nodelist):
    env = srun_env(SLURM_STEP_NODELIST=nodelist, SLURM_JOB_NODELIST=nodelist)
    with pytest.raises(ValueError, match="rendezvous with itself"):
        ops._slurm_options(env)


def test_single_node_on_loopback_is_fine():
    opts = ops._slurm_options(srun_env(SLURM_STEP_NUM_NODES="1", SLURM_NODEID="0",
                                       SLURM_STEP_NODELIST="127.0.0.1"))
    assert opts["rdzv_endpoint"] == "127.0.0.1:29400"


@pytest.mark.parametrize("env, words", [
    ({}, "SLURM_JOB_ID is not set"),
    ({"SLURM_JOB_ID": "1"}, "SLURM_STEP_NUM_NODES is not set"),
    ({"SLURM_JOB_ID": "1", "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n[1-2]"},
     "not under srun"),
    (srun_env(SLURM_NODEID="x"), "must be integers"),
    (srun_env(SLURM_NODEID="2"), "inconsistent"),
])
def test_not_under_srun(env, words):
    with pytest.raises(ValueError, match=words):
        ops._slurm_options(env)


def test_ipv6_first_host_is_bracketed():
    opts = ops._slurm_options(srun_env(SLURM_STEP_NODELIST="fd00::3,fd00::4"))
    assert opts["rdzv_endpoint"] == "[fd00::3]:29400"


def slurm_args(argv, env):
    """The option values --slurm gives (as _config_from_args sees them)."""
    return ops._slurm_values(ops._parse_args(argv + ["train.py"], env), env)


def test_launcher_options_from_slurm_and_explicit_ones_win():
    env = srun_env(SLURM_NODEID="0", SLURM_STEP_NODELIST="gpu[01-02]")
    o = slurm_args(["--slurm"], env)
    assert (o["nnodes"], o["node_rank"], o["rdzv_endpoint"], o["rdzv_id"], o["rdzv_backend"]) == (
        "2", 0, "gpu01:29400", "4242.0", "c10d")
    assert o["rdzv_conf"] == "is_host=1"  # node 0 hosts: Slurm's short names need not match gethostname()
    o = slurm_args(["--slurm", "--rdzv-conf", "join_timeout=5"], srun_env(SLURM_STEP_NODELIST="gpu[01-02]"))
    assert o["rdzv_conf"] == "join_timeout=5,is_host=0"
    env = dict(env, PET_RDZV_ID="mine")
    o = slurm_args(["--slurm", "--nnodes", "1:2", "--rdzv-endpoint", "127.0.0.1:5000"], env)
    assert (o["nnodes"], o["rdzv_endpoint"], o["rdzv_id"], o["rdzv_conf"]) == ("1:2", "127.0.0.1:5000", "mine", "")


def test_slurm_environment_errors_are_usage_errors():
    with pytest.raises(ops._UsageError, match="SLURM_JOB_ID is not set"):
        slurm_args(["--slurm"], {})
    env = srun_env(SLURM_STEP_NODELIST="127.0.0.[1-2]")
    with pytest.raises(ops._UsageError, match="rendezvous with itself"):
        slurm_args(["--slurm"], env)
    assert slurm_args(["--slurm", "--rdzv-endpoint", "127.0.0.1:5000"], env)["rdzv_endpoint"] == "127.0.0.1:5000"


# --slurm through real launchers.
RANKS = "import os\nprint('RANK=%s WORLD=%s RUN=%s' % (os.environ['RANK'], os.environ['WORLD_SIZE'], " \
        "os.environ['TORCHELASTIC_RUN_ID']), flush=True)\n"



def srun_node_env(node_id, nodelist, **extra):
    return clean_env(SLURM_JOB_ID="4242", SLURM_STEP_ID="7", SLURM_NNODES="2", SLURM_STEP_NUM_NODES="2",
                      SLURM_NODEID=node_id, SLURM_JOB_NODELIST=nodelist, SLURM_STEP_NODELIST=nodelist,
                      SLURM_PROCID=node_id, **extra)


def test_slurm_two_nodes_explicit_endpoint_wins(tmp_path):
    ranks = write_script(tmp_path, "ranks.py", RANKS)
    # Slurm's own endpoint would be node1:29400; the explicit one wins, so no name is looked up
    args = ["--slurm", "--nproc-per-node", "2", "--rdzv-endpoint", "127.0.0.1:%d" % free_port(),
            "--rdzv-conf", "last_call_timeout=1,join_timeout=%d" % GUARD] + FAST + [ranks]
    nodes = []
    try:
        for node_id in ("0", "1"):
            nodes.append(Launcher(args, tmp_path, "node%s" % node_id, environ=srun_node_env(node_id, "node[1-2]")))
        seen = []
        for node in nodes:
            assert node.wait(GUARD) == 0, node.err()
            seen += re.findall(r"RANK=(\d) WORLD=(\d) RUN=(\S+)", node.out())
        assert sorted(seen) == [(str(r), "4", "4242.7") for r in range(4)]
    finally:
        for node in nodes:
            node.stop()


def test_slurm_multi_node_loopback_endpoint_refused(tmp_path):
    ranks = write_script(tmp_path, "ranks.py", RANKS)
    a = Launcher(["--slurm", ranks], tmp_path, environ=srun_node_env("0", "127.0.0.[1-2]"))
    try:
        assert a.wait(GUARD) == 2
        lines = a.err().splitlines()
        assert len(lines) == 1 and lines[0].startswith("elasticrun: error: --slurm:"), lines
        assert "127.0.0.1" in lines[0] and "rendezvous with itself" in lines[0]
        assert a.out() == ""
    finally:
        a.stop()


# The store of a --slurm job has a token every node derives alike from a per-user secret in the home
# folder (the one thing the job's nodes share that other users can't read): one write by anyone else
# can no longer forge a failure, grant restarts or end the run.
PROBE = "import os, store\n" \
        "if os.environ['RANK'] == '0':\n" \
        "    host, port = os.environ['PROBE_ENDPOINT'].rsplit(':', 1)\n" \
        "    try:\n" \
        "        store.TCPStore(host, int(port), timeout=10).set('elastic/x/closed', '1')\n" \
        "        print('PROBE OPEN', flush=True)\n" \
        "    except store.StoreAuthError:\n" \
        "        print('PROBE REFUSED', flush=True)\n"


def test_slurm_store_has_a_token_the_nodes_share(tmp_path):
    probe = write_script(tmp_path, "probe.py", PROBE)
    endpoint = "127.0.0.1:%d" % free_port()
    args = ["--slurm", "--rdzv-endpoint", endpoint, "--rdzv-conf", "last_call_timeout=1,join_timeout=%d" % GUARD
            ] + FAST + [probe]
    home = tmp_path / "home"
    home.mkdir()
    nodes = []
    try:
        for node_id in ("0", "1"):
            nodes.append(Launcher(args, tmp_path, "node%s" % node_id,
                                  environ=srun_node_env(node_id, "node[1-2]", HOME=home, PROBE_ENDPOINT=endpoint)))
        for node in nodes:
            assert node.wait(GUARD) == 0, node.err()
        assert "PROBE REFUSED" in nodes[0].out() + nodes[1].out()
        secret = home / ".elasticrun" / "secret"
        assert secret.stat().st_mode & 0o777 == 0o600
    finally:
        for node in nodes:
            node.stop()


def test_slurm_token_per_job_and_refused_when_others_can_read_the_secret(tmp_path):
    env = {"HOME": str(tmp_path)}
    a, b = ops._slurm_token(env, "4242.7"), ops._slurm_token(env, "4242.7")
    assert a == b and a != ops._slurm_token(env, "4242.8") and len(a) == 64
    os.chmod(str(tmp_path / ".elasticrun" / "secret"), 0o644)
    with pytest.raises(ops._UsageError, match="readable by you alone"):
        ops._slurm_token(env, "4242.7")
    # an explicit token file wins: no secret is needed
    o = slurm_args(["--slurm", "--rdzv-conf", "token_file=%s" % __file__], srun_env(SLURM_STEP_NODELIST="gpu[01-02]"))
    assert ops._store_token(o, "c10d", ops._parse_conf(o["rdzv_conf"]), "4242.0", {"HOME": "/nonexistent"}) is None


def test_slurm_nodes_with_different_secrets_are_told_why(tmp_path):
    probe = write_script(tmp_path, "probe.py", "pass\n")
    endpoint = "127.0.0.1:%d" % free_port()
    nodes = []
    try:
        for node_id in ("0", "1"):
            home = tmp_path / ("home%s" % node_id)   # homes not shared: each node makes its own secret
            home.mkdir()
            conf = "join_timeout=%d,is_host=%d" % (GUARD, node_id == "0")   # node 0 serves the store
            args = ["--slurm", "--rdzv-endpoint", endpoint, "--rdzv-conf", conf] + FAST + [probe]
            nodes.append(Launcher(args, tmp_path, "node%s" % node_id, environ=srun_node_env(node_id, "node[1-2]",
                                                                                             HOME=home)))
        assert nodes[1].wait(GUARD) == 2, nodes[1].err()
        lines = nodes[1].err().splitlines()
        assert len(lines) == 1 and "refused our token" in lines[0] and "~/.elasticrun/secret" in lines[0], lines
    finally:
        for node in nodes:
            node.stop()
