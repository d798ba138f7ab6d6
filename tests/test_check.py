"""`elasticrun --check`: real launcher processes meeting on 127.0.0.1, the table, the exit statuses."""
import os
import shutil
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from agent_scripts.harness import ELASTIC, Launcher, StoreProcess, clean_env, write_script  # noqa: E402
from ports import free_port  # noqa: E402

CONF = "last_call_timeout=1,heartbeat_interval=0.2,heartbeat_timeout=1.5,join_timeout=60"


def c10d(endpoint, run_id, *extra):
    return (["--check", "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
             "--rdzv-id", run_id, "--rdzv-conf", CONF] + list(extra))


def two_nodes(tmp_path, args_a, args_b, environ=None):
    """Both nodes' (exit status, stdout, stderr)."""
    nodes = []
    try:
        for name, args in (("a", args_a), ("b", args_b)):
            nodes.append(Launcher(args, tmp_path, name, environ=environ or clean_env()))
        return [(n.wait(120), n.out(), n.err()) for n in nodes]
    finally:
        for n in nodes:
            n.stop()


def the_table(results):
    """The one stdout holding the table (the store host's), and the other nodes' stdout."""
    tables = [out for _, out, _ in results if "elasticrun check:" in out]
    assert len(tables) == 1, results
    return tables[0]


def test_two_good_nodes_pass_and_one_table_is_printed(tmp_path):
    script = write_script(tmp_path, "train.py", "print('hello')\n")
    endpoint = "127.0.0.1:%d" % free_port()
    results = two_nodes(tmp_path, c10d(endpoint, "job1", script, "--lr", "0.1"),
                        c10d(endpoint, "job1", script, "--lr", "0.1"))
    assert [code for code, _, _ in results] == [0, 0], results
    table = the_table(results)
    assert "check passed: 2 node(s), 0 failed line(s)" in table
    lines = table.splitlines()
    assert lines[1].split()[:3] == ["node", "address", "endpoint"]
    rows = [line for line in lines if line[:2] in ("0 ", "1 ")]
    assert len(rows) == 2
    assert sum("served here" in row for row in rows) == 1      # the store host, and only it
    assert all("127.0.0.1 lo IPv4" in row and "ok IPv4" in row for row in rows)
    assert all(" ms " in row for row in rows)                  # a clock offset for each node
    assert "FAIL" not in table
    for _, _, err in results:
        assert "check passed" in err
        assert "started" not in err                             # no worker


def test_a_stale_script_on_one_node_fails_both(tmp_path):
    good = write_script(tmp_path, "train.py", "print('v2')\n")
    (tmp_path / "old").mkdir()
    stale = write_script(tmp_path / "old", "train.py", "print('v1')\n")
    endpoint = "127.0.0.1:%d" % free_port()
    results = two_nodes(tmp_path, c10d(endpoint, "job2", good), c10d(endpoint, "job2", stale))
    assert [code for code, _, _ in results] == [1, 1], results
    table = the_table(results)
    assert "script differs from most nodes" in table and "copy the same" in table
    assert "check FAILED" in table
    assert sum(line.startswith("FAIL") for line in table.splitlines()) == 1
    for _, _, err in results:
        assert "check FAILED" in err


def test_different_script_arguments_fail(tmp_path):
    script = write_script(tmp_path, "train.py", "pass\n")
    endpoint = "127.0.0.1:%d" % free_port()
    results = two_nodes(tmp_path, c10d(endpoint, "job3", script, "--epochs", "3"),
                        c10d(endpoint, "job3", script, "--epochs", "4"))
    assert [code for code, _, _ in results] == [1, 1], results
    assert "arguments differ from most nodes" in the_table(results)


def test_the_check_leaves_the_jobs_run_alone_on_a_store_that_outlives_it(tmp_path):
    """Checked twice on an outliving store, then the job itself runs under the same run id."""
    script = write_script(tmp_path, "train.py", "print('ran')\n")
    store = StoreProcess()
    try:
        for attempt in range(2):
            results = two_nodes(tmp_path, c10d(store.endpoint, "job4", script), c10d(store.endpoint, "job4", script))
            assert [code for code, _, _ in results] == [0, 0], (attempt, results)
            assert "no checking node serves the rendezvous store" in the_table(results)   # a warning only
        job = [a for a in c10d(store.endpoint, "job4", script) if a != "--check"]
        results = two_nodes(tmp_path, job, job)
        assert [code for code, _, _ in results] == [0, 0], results
        assert all("ran" in out for _, out, _ in results)
    finally:
        store.stop()


def test_a_node_that_cannot_meet_the_others_says_so(tmp_path):
    script = write_script(tmp_path, "train.py", "pass\n")
    a = Launcher(["--check", "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                  "127.0.0.1:%d" % free_port(), "--rdzv-conf", "is_host=0,join_timeout=1", script],
                 tmp_path, "a", environ=clean_env())
    try:
        assert a.wait(60) == 1, a.err()
        assert "could not meet the other nodes" in a.out()
        assert "check FAILED: 1 node(s)" in a.out()
    finally:
        a.stop()


def test_a_rendezvous_port_held_by_another_program_fails(tmp_path):
    script = write_script(tmp_path, "train.py", "pass\n")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        a = Launcher(["--check", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:%d" % port,
                      "--rdzv-conf", "join_timeout=1,read_timeout=1", script], tmp_path, "a", environ=clean_env())
        try:
            assert a.wait(60) == 1, a.err()
        finally:
            a.stop()
    assert "the rendezvous port %d on this node (the endpoint's host) is held by a program that serves no " \
           "store" % port in a.out()


def standalone(tmp_path, *args, environ=None, cmd=None):
    a = Launcher(["--check", "--standalone"] + list(args), tmp_path, "s", environ=environ or clean_env(), cmd=cmd)
    try:
        return a.wait(60), a.out(), a.err()
    finally:
        a.stop()


def test_standalone_check_passes(tmp_path):
    script = write_script(tmp_path, "train.py", "pass\n")
    code, out, err = standalone(tmp_path, script)
    assert code == 0, out + err
    assert "check passed: 1 node(s)" in out


def test_log_dir_that_cannot_be_written_fails_with_advice(tmp_path):
    script = write_script(tmp_path, "train.py", "pass\n")
    blocker = write_script(tmp_path, "a_file", "")
    code, out, err = standalone(tmp_path, "--log-dir", os.path.join(blocker, "logs"), script)
    assert code == 1, out + err
    assert "cannot be created here" in out and "give --log-dir a writable folder" in out


def test_read_only_log_dir_fails_with_advice(tmp_path):
    script = write_script(tmp_path, "train.py", "pass\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    if os.geteuid() != 0:
        logs.chmod(0o500)
        cmd = None
    else:   # root writes anywhere: a read-only mount in a private mount namespace
        if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"]).returncode:
            pytest.skip("no mount namespaces here")
        cmd = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"', str(logs),
               sys.executable, ELASTIC]
    code, out, err = standalone(tmp_path, "--log-dir", str(logs), script, cmd=cmd)
    assert code == 1, out + err
    assert "is not writable" in out and "give --log-dir a folder this user may write" in out


def test_missing_script_is_a_failed_line_not_a_usage_error(tmp_path):
    code, out, err = standalone(tmp_path, str(tmp_path / "nowhere.py"))
    assert code == 1, out + err
    assert "is not on this node: copy it here" in out
    code, out, err = standalone(tmp_path, "-m", "no_such_module_here")
    assert code == 1, out + err
    assert "module no_such_module_here is not on this node" in out


def test_more_workers_than_cpus_or_gpus_fail(tmp_path):
    script = write_script(tmp_path, "train.py", "pass\n")
    code, out, err = standalone(tmp_path, "--nproc-per-node", "2", script,
                                cmd=["taskset", "-c", "0", sys.executable, ELASTIC])
    assert code == 1, out + err
    assert "2 workers share 1 CPU(s)" in out and "srun --cpus-per-task" in out
    # four GPUs as nvidia-smi lists them, two of them visible, four workers
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_script(bin_dir, "nvidia-smi", "#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: Fake (UUID: GPU-$i)\"; done\n")
    os.chmod(str(bin_dir / "nvidia-smi"), 0o755)
    environ = clean_env(PATH="%s:%s" % (bin_dir, os.environ["PATH"]), CUDA_VISIBLE_DEVICES="0,1")
    code, out, err = standalone(tmp_path, "--nproc-per-node", "4", script, environ=environ)
    assert code == 1, out + err
    assert "4 workers but 2 GPU(s) visible (CUDA_VISIBLE_DEVICES=0,1)" in out
    assert "lower --nproc-per-node to 2" in out
    # --nproc-per-node gpu on a node without GPUs: a failed line (the job itself exits 2 there)
    environ = clean_env(PATH="%s:%s" % (tmp_path / "nobin", os.environ["PATH"]))
    if shutil.which("nvidia-smi", path=environ["PATH"]) is None:
        code, out, err = standalone(tmp_path, "--nproc-per-node", "gpu", script, environ=environ)
        assert code == 1, out + err
        assert "--nproc-per-node gpu but nvidia-smi -L lists no GPU on this node" in out


def test_master_port_in_use_on_rank_0_fails(tmp_path):
    script = write_script(tmp_path, "train.py", "pass\n")
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen(1)
        port = held.getsockname()[1]
        code, out, err = standalone(tmp_path, "--master-port", str(port), script)
    assert code == 1, out + err
    assert "--master-port %d is in use on this node" % port in out
    with socket.socket(socket.AF_INET6) as held:   # held on IPv6 only: the workers' store would fail too
        held.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            held.bind(("::", 0))
        except OSError:
            held = None
        if held is not None:
            held.listen(1)
            port = held.getsockname()[1]
            code, out, err = standalone(tmp_path, "--master-port", str(port), script)
            assert code == 1, out + err
            assert "--master-port %d is in use on this node" % port in out
    port = free_port()
    code, out, err = standalone(tmp_path, "--master-port", str(port), script)
    assert code == 0, out + err
    assert "master %d free" % port in out
    a = Launcher(["--check", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:%d" % port,
                  "--master-port", str(port), script], tmp_path, "a", environ=clean_env())
    try:
        assert a.wait(60) == 1, a.err()
    finally:
        a.stop()
    assert "--master-port %d is the rendezvous port, served by this node" % port in a.out()


def test_an_address_the_leader_cannot_reach_fails(tmp_path):
    script = write_script(tmp_path, "train.py", "pass\n")
    # TEST-NET-1: never this machine's, so connecting back to it fails
    code, out, err = standalone(tmp_path, "--local-addr", "192.0.2.1", script)
    assert code == 1, out + err
    assert "this node's address 192.0.2.1 is not reachable from the leader" in out
    assert "give --local-addr" in out


def netns_check(tmp_path, net, local_addrs, run_id, endpoint_host=None):
    """`--check` on hosts 0 and 1 (store on host 0): [(exit status, stdout, stderr)] by host."""
    import subprocess as sp
    script = write_script(tmp_path, "train.py", "pass\n")
    endpoint = "%s:%d" % (endpoint_host or net.addr(0), free_port())
    procs = []
    for i, addr in enumerate(local_addrs):
        args = c10d(endpoint, run_id, "--local-addr", addr, script)
        out, err = open(str(tmp_path / ("%d.out" % i)), "wb"), open(str(tmp_path / ("%d.err" % i)), "wb")
        procs.append((net.popen(i, [sys.executable, ELASTIC] + args, stdout=out, stderr=err, env=clean_env()),
                      out, err))
    results = []
    for i, (proc, out, err) in enumerate(procs):
        try:
            code = proc.wait(120)
        except sp.TimeoutExpired:
            code = None
        out.close()
        err.close()
        results.append((code, (tmp_path / ("%d.out" % i)).read_text(), (tmp_path / ("%d.err" % i)).read_text()))
    return results


def test_two_hosts_show_their_interfaces_and_a_loopback_address_fails(tmp_path):
    from conftest import need
    from netns import Network, netns_problem
    problem = netns_problem()
    need(problem is None, problem or "")
    with Network(2) as net:
        results = netns_check(tmp_path, net, net.addrs, "hosts1")
        assert [code for code, _, _ in results] == [0, 0], results
        table = the_table(results)
        for i in range(2):   # the interface found from the address, the family, the route to the store
            row = [line for line in table.splitlines() if line.startswith("%d " % i)][0]
            assert "%s eth0 IPv4" % net.addr(i) in row and "ok %s eth0 IPv4" % net.addr(i) in row, table
        # host 1 advertises 127.0.0.1: the store host reaches only itself there
        results = netns_check(tmp_path, net, [net.addr(0), "127.0.0.1"], "hosts2")
        assert [code for code, _, _ in results] == [1, 1], results
        table = the_table(results)
        assert "127.0.0.1 is a loopback address" in table
        assert "give --local-addr" in table
        # the same over IPv6: the interface comes from /proc/net/if_inet6
        v6 = ["fd00:e1::%d" % (i + 1) for i in range(2)]
        for i, addr in enumerate(v6):
            subprocess.run(["ip", "-n", net.names[i], "addr", "add", addr + "/64", "dev", "eth0", "nodad"],
                           check=True)
        results = netns_check(tmp_path, net, v6, "hosts3", endpoint_host="[%s]" % v6[0])
        assert [code for code, _, _ in results] == [0, 0], results
        table = the_table(results)
        for i in range(2):
            row = [line for line in table.splitlines() if line.startswith("%d " % i)][0]
            assert "%s eth0 IPv6" % v6[i] in row and "ok %s eth0 IPv6" % v6[i] in row and "ok IPv6" in row, table


def test_etcd_check_is_led_by_rank_0_and_can_be_repeated(tmp_path, etcd_binary):
    from etcd_cluster import EtcdCluster
    script = write_script(tmp_path, "train.py", "pass\n")
    with EtcdCluster(etcd_binary, tmp_path, size=1) as cluster:
        args = ["--check", "--nnodes", "2", "--rdzv-backend", "etcd", "--rdzv-endpoint", cluster.endpoints[0],
                "--rdzv-id", "job5", "--rdzv-conf", CONF, script]
        for attempt in range(2):
            results = two_nodes(tmp_path, args, args)
            assert [code for code, _, _ in results] == [0, 0], (attempt, results)
            table = the_table(results)
            assert "check passed: 2 node(s)" in table and "rendezvous etcd" in table


def test_a_clock_off_by_seconds_fails_and_a_few_ms_pass():
    """The leader's side against real listeners whose clocks run 5 s and 0 s off (the clock seam)."""
    import time
    import elastic

    def report(listener):
        node = elastic._CheckNode()
        node.facts.update(addr="127.0.0.1", listen=listener.port, nonce=listener.nonce, host="n")
        return node

    ahead, same = elastic._CheckListener(clock=lambda: time.time() + 5.0), elastic._CheckListener()
    try:
        nodes = {0: report(same), 1: report(ahead)}
        elastic._check_across(nodes, 0, None)
    finally:
        ahead.close()
        same.close()
    assert not nodes[0].failed(), nodes[0].issues
    assert [(s, c) for s, c, _ in nodes[1].issues] == [("FAIL", "clock")]
    assert "synchronise the clocks" in nodes[1].issues[0][2]
    assert nodes[1].cells["clock"].startswith("+5") and nodes[1].cells["clock"].endswith(" ms")


def test_ipv6_endpoint_and_address_are_reported_as_ipv6(tmp_path):
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
    script = write_script(tmp_path, "train.py", "pass\n")
    a = Launcher(["--check", "--rdzv-backend", "c10d", "--rdzv-endpoint", "[::1]:%d" % free_port(),
                  "--local-addr", "::1", script], tmp_path, "a", environ=clean_env())
    try:
        assert a.wait(60) == 0, a.out() + a.err()
    finally:
        a.stop()
    row = [line for line in a.out().splitlines() if line.startswith("0 ")][0]
    assert "::1 lo IPv6" in row and "ok ::1 lo IPv6" in row and "ok IPv6" in row, a.out()


def test_slurm_check_then_the_job_on_the_same_port(tmp_path):
    """As `srun elasticrun --check --slurm ...` then `srun elasticrun --slurm ...`: Slurm's node 0 serves the
    check's store and prints the table, and the job then serves its own store on the same port."""
    script = write_script(tmp_path, "train.py", "import os\nprint('RANK=' + os.environ['RANK'], flush=True)\n")

    def node_env(node_id):
        return clean_env(SLURM_JOB_ID="4242", SLURM_STEP_ID="7", SLURM_NNODES="2", SLURM_STEP_NUM_NODES="2",
                         SLURM_NODEID=node_id, SLURM_JOB_NODELIST="node[1-2]", SLURM_STEP_NODELIST="node[1-2]",
                         SLURM_PROCID=node_id)

    args = ["--slurm", "--rdzv-endpoint", "127.0.0.1:%d" % free_port(), "--rdzv-conf", "last_call_timeout=1",
            script]
    for check in (True, False):
        nodes = []
        try:
            for node_id in ("0", "1"):
                nodes.append(Launcher(["--check"] * check + args, tmp_path, "node%s" % node_id,
                                      environ=node_env(node_id)))
            results = [(n.wait(120), n.out(), n.err()) for n in nodes]
        finally:
            for n in nodes:
                n.stop()
        assert [code for code, _, _ in results] == [0, 0], results
        if check:
            # on one host either node may bind the endpoint first: the one serving the store prints
            serving = [i for i, (_, _, err) in enumerate(results) if "serving the rendezvous store" in err]
            assert len(serving) == 1, results
            host, other = results[serving[0]], results[1 - serving[0]]
            assert "elasticrun check: run 4242.7" in host[1] and other[1] == ""
            assert "run 4242.7.check" in host[2]
        else:
            assert sorted(out.strip() for _, out, _ in results) == ["RANK=0", "RANK=1"]


def test_the_code_digest_is_the_same_from_the_file_with_m_and_from_the_zipapp(tmp_path):
    """Nodes may launch the same code different ways; only different code may differ."""
    from agent_scripts.harness import ROOT
    script = write_script(tmp_path, "train.py", "pass\n")
    bundle = str(tmp_path / "elasticrun.pyz")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_bundle.py"), "-o", bundle], check=True,
                   stdout=subprocess.DEVNULL)
    digests = set()
    for cmd in ([sys.executable, ELASTIC], [sys.executable, "-m", "elastic"], [sys.executable, bundle]):
        code, out, err = standalone(tmp_path, script, cmd=cmd)
        assert code == 0, (cmd, out, err)
        row = [line for line in out.splitlines() if line.startswith("0 ")][0]
        header = [line for line in out.splitlines() if line.startswith("node ")][0]
        digests.add(row[header.index("elasticrun"):header.index("script")].strip())
    assert len(digests) == 1, digests
