"""Mistakes refused and bad nodes excluded: launchers that must not form one world, a node whose
workers keep failing leaving the job while a spare takes its place. Real launchers on one machine,
told apart by their --local-addr (127.0.0.x), meeting on a store process."""
import os
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import rendezvous  # noqa: E402
import store as _store  # noqa: E402
from agent_scripts.harness import SCRIPTS, Launcher, StoreProcess, clean_env, wait_for  # noqa: E402

FLAKY = os.path.join(SCRIPTS, "flaky.py")
ENVDUMP = os.path.join(SCRIPTS, "envdump.py")
FAST = ["--monitor-interval", "0.05", "--shutdown-timeout", "2"]
CONF = "last_call_timeout=1,heartbeat_interval=0.2,heartbeat_timeout=1.5,join_timeout=60"
EXCLUDED = 75


def c10d(store, nnodes, run_id, addr, *extra, conf=CONF):
    return ["--nnodes", nnodes, "--rdzv-backend", "c10d", "--rdzv-endpoint", store.endpoint,
            "--rdzv-id", run_id, "--rdzv-conf", conf, "--local-addr", addr] + FAST + list(extra)


def stop_all(procs, store=None):
    for p in procs:
        p.stop()
    if store is not None:
        store.stop()


# ------------------------------------------------------------------------------- mistakes refused

def test_a_node_with_other_settings_is_refused_naming_both_values(tmp_path):
    """Same run id, other --nnodes / --nproc-per-node / script arguments: refused (exit 2) with both
    values named, before taking a slot; the job of the matching nodes runs as if it never came."""
    out = tmp_path / "env"
    out.mkdir()
    store = StoreProcess()
    procs = []
    try:
        first = Launcher(c10d(store, "2", "job", "127.0.0.1") + [ENVDUMP, str(out)], tmp_path, "first",
                         environ=clean_env())
        procs.append(first)
        with _store.TCPStore("127.0.0.1", store.port, timeout=60) as client:
            client.wait(["elastic/job/job"])       # the run's record holds the first node's settings
        wrong = [("nnodes", c10d(store, "2:3", "job", "127.0.0.2") + [ENVDUMP, str(out)], "nnodes 2:3 here, 2 in"),
                 ("nproc", c10d(store, "2", "job", "127.0.0.2", "--nproc-per-node", "2") + [ENVDUMP, str(out)],
                  "nproc_per_node (role default) 2 here, 1 in"),
                 ("args", c10d(store, "2", "job", "127.0.0.2") + [ENVDUMP, str(out), "5"], "script ")]
        for name, args, said in wrong:
            p = Launcher(args, tmp_path, name, environ=clean_env())
            procs.append(p)
            assert p.wait(60) == 2, p.err()
            err = p.err()
            assert said in err and "does not match run 'job'" in err, err
            assert "127.0.0.1" in err              # whose settings the run has
        said = procs[-1].err()       # the script's line, its last arguments kept, on both sides
        assert "/env 5 [crc32" in said and "/env [crc32" in said and ("script (role default) " + ENVDUMP[:5]) in said, said
        second = Launcher(c10d(store, "2", "job", "127.0.0.2") + [ENVDUMP, str(out)], tmp_path, "second",
                          environ=clean_env())
        procs.append(second)
        assert first.wait(60) == 0, first.err()
        assert second.wait(60) == 0, second.err()
        assert sorted(os.listdir(str(out))) == ["default_0_0_2.json", "default_1_0_2.json"]
    finally:
        stop_all(procs, store)


def test_nodes_of_a_role_must_agree_while_roles_may_differ(tmp_path):
    """--nproc-per-node and the script are compared among nodes of one --role: the first node of
    another role adds that role's values to the run's record, and a later node of it must match."""
    out = tmp_path / "env"
    out.mkdir()
    store = StoreProcess()
    procs = []

    def launch(name, addr, role, nproc):
        p = Launcher(c10d(store, "3", "roles", addr, "--role", role, "--nproc-per-node", nproc) + [ENVDUMP, str(out)],
                     tmp_path, name, environ=clean_env())
        procs.append(p)
        return p

    try:
        with _store.TCPStore("127.0.0.1", store.port, timeout=60) as client:
            trainer = launch("trainer", "127.0.0.1", "trainer", "1")
            client.wait(["elastic/roles/job"])
            ps = launch("ps", "127.0.0.2", "ps", "2")
            wait_for(lambda: b"(role ps)" in client.get("elastic/roles/job"), what="the ps settings recorded")
        wrong = launch("wrong", "127.0.0.3", "ps", "3")
        assert wrong.wait(60) == 2, wrong.err()
        assert "nproc_per_node (role ps) 3 here, 2 in the run" in wrong.err(), wrong.err()
        last = launch("last", "127.0.0.3", "ps", "2")
        assert [p.wait(60) for p in (trainer, ps, last)] == [0, 0, 0], trainer.err() + ps.err() + last.err()
        assert len(os.listdir(str(out))) == 5
    finally:
        stop_all(procs, store)


def test_standalone_with_several_nodes_is_refused(tmp_path):
    p = Launcher(["--standalone", "--nnodes", "2", ENVDUMP, str(tmp_path)], tmp_path, "a", environ=clean_env())
    try:
        assert p.wait(60) == 2
        assert "--standalone" in p.err() and "--nnodes 2" in p.err()
        assert len(p.err().strip().splitlines()) == 1
        assert not [f for f in os.listdir(str(tmp_path)) if f.endswith(".json")]
    finally:
        p.stop()


@pytest.mark.parametrize("nodes", [1, 2])
def test_a_finished_runs_id_is_refused_whatever_the_node_count(tmp_path, nodes):
    """One node or two, a job reusing a finished run's id exits 2 naming the run id, running nothing."""
    out = tmp_path / "env"
    out.mkdir()
    store = StoreProcess()
    procs = []
    try:
        for i in range(nodes):
            procs.append(Launcher(c10d(store, str(nodes), "reused", "127.0.0.%d" % (i + 1)) + [ENVDUMP, str(out)],
                                  tmp_path, "first%d" % i, environ=clean_env()))
        assert [p.wait(60) for p in procs] == [0] * nodes, [p.err() for p in procs]
        again = Launcher(c10d(store, str(nodes), "reused", "127.0.0.9") + [ENVDUMP, str(out)], tmp_path, "again",
                         environ=clean_env())
        procs.append(again)
        assert again.wait(60) == 2, again.err()
        assert "closed before this node joined" in again.err() and "'reused'" in again.err()
        assert len(os.listdir(str(out))) == nodes      # the second job started nothing
    finally:
        stop_all(procs, store)


# ---------------------------------------------------------------------------------- bad nodes

def test_a_failing_node_is_excluded_and_a_spare_takes_its_place(tmp_path):
    """3 launchers for --nnodes 2:2: the third waits as a spare; the bad node's worker fails, it
    leaves with the exclusion status naming itself, the spare steps in, the job succeeds on the
    two good nodes; the bad host coming back is refused until its cooldown ends."""
    work = tmp_path / "work"
    work.mkdir()
    store = StoreProcess()
    conf = CONF + ",exclude_after=1,exclude_cooldown=600"
    procs = []

    def launch(name, addr, bad):
        p = Launcher(c10d(store, "2:2", "spares", addr, "--max-restarts", "3", conf=conf) + [FLAKY, str(work)],
                     tmp_path, name, environ=clean_env(NODE=name, BAD_NODE="1" if bad else "0"))
        procs.append(p)
        return p

    try:
        bad = launch("bad", "127.0.0.2", True)
        good = launch("good", "127.0.0.1", False)
        for p in (bad, good):
            wait_for(lambda: "rendezvous round 0 done" in p.err(), what="round 0", explain=p.err)
        spare = launch("spare", "127.0.0.3", False)
        wait_for(lambda: "waits as a spare" in spare.err(), what="the spare's narration", explain=spare.err)
        status = subprocess.run([sys.executable, os.path.join(os.path.dirname(HERE), "elastic.py"), "status",
                                 "--rdzv-endpoint", store.endpoint, "--rdzv-id", "spares"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=clean_env(), timeout=60)
        assert "nodes waiting: 1 (127.0.0.3 spare)" in status.stdout.decode(), status.stdout.decode()
        (work / "go").touch()
        assert bad.wait(60) == EXCLUDED, bad.err()
        said = bad.err()
        assert "excluded: host 127.0.0.2 leaves run 'spares'" in said, said
        assert "root cause of 1 failure within 3600 s, the last: rank 1 exited" in said
        wait_for(lambda: "restarting the worker group (1/3)" in good.err(), what="good's restart", explain=good.err)
        again = launch("again", "127.0.0.2", True)       # the bad host back while the job runs
        assert again.wait(60) == EXCLUDED, again.err()
        assert "host 127.0.0.2 was excluded from run 'spares'" in again.err()
        assert "refused until" in again.err()
        (work / "ok").touch()
        assert good.wait(60) == 0, good.err()
        assert spare.wait(60) == 0, spare.err()
        assert "spare 127.0.0.3 steps in" in spare.err(), spare.err()
        assert sorted(f for f in os.listdir(str(work)) if f.startswith("done_")) == [
            "done_good_0_2", "done_spare_1_2"]
    finally:
        stop_all(procs, store)


def test_exclusion_counts_failures_within_the_window_only(tmp_path):
    """exclude_after=2: one failure is counted, the second within the window excludes; failures
    further apart than exclude_window never add up."""
    store = StoreProcess()
    handlers = []
    try:
        def handler(addr, window):
            params = rendezvous.RendezvousParameters(
                "c10d", store.endpoint, "window", 1, 1, local_addr=addr, is_host="0",
                exclude_after="2", exclude_window=str(window))
            h = rendezvous.get_rendezvous_handler(params)
            handlers.append(h)
            return h
        near = handler("127.0.0.5", 600)
        near.note_root_cause("rank 0 exited")
        with pytest.raises(rendezvous.RendezvousExcludedError) as caught:
            near.note_root_cause("rank 0 exited again")
        assert caught.value.host == "127.0.0.5" and "2 failures within 600 s" in str(caught.value)
        far = handler("127.0.0.6", 0.2)
        far.note_root_cause("first")
        start = time.monotonic()
        while time.monotonic() - start < 0.4:     # the window passes (monotonic: no wall-clock jumps)
            time.sleep(0.05)
        far.note_root_cause("second, outside the window")     # does not raise
        with pytest.raises(rendezvous.RendezvousExcludedError):
            handler("127.0.0.5", 600).next_rendezvous()      # the excluded host, back too soon
    finally:
        for h in handlers:
            h.close()
        store.stop()


def test_exclusion_settings_are_checked():
    def params(**conf):
        return rendezvous.RendezvousParameters("c10d", "127.0.0.1:1", "x", 1, 2, **conf)
    assert params().exclude_after == 0
    p = params(exclude_after="3", exclude_window="60", exclude_cooldown="120")
    assert (p.exclude_after, p.exclude_window, p.exclude_cooldown) == (3, 60.0, 120.0)
    for conf, said in [({"exclude_after": "-1"}, "exclude_after"), ({"exclude_after": "x"}, "exclude_after"),
                       ({"exclude_window": "60"}, "needs exclude_after"),
                       ({"exclude_after": "1", "exclude_cooldown": "0"}, "exclude_cooldown")]:
        with pytest.raises(ValueError, match=said):
            params(**conf)
    with pytest.raises(ValueError, match="static"):
        rendezvous.RendezvousParameters("static", "127.0.0.1:1", "x", 1, 1, exclude_after="1")


def test_on_three_hosts_the_bad_one_is_excluded_and_the_spare_steps_in(tmp_path):
    """The same on simulated hosts (network namespaces; each node is known by its own address): host
    0 serves the store and runs well, host 1's worker always fails, host 2 is the spare."""
    from conftest import need
    from netns import RDZV_CONF, Network, netns_problem
    problem = netns_problem()
    need(problem is None, problem or "")
    work = tmp_path / "work"
    work.mkdir()
    with Network(3) as net:
        procs, outs = {}, {}

        def start(i, bad):
            outs[i] = str(tmp_path / ("h%d.log" % i))
            argv = [sys.executable, os.path.join(os.path.dirname(HERE), "elastic.py"), "--nnodes", "2:2",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", net.addr(0) + ":29400", "--rdzv-id", "netbad",
                    "--rdzv-conf", RDZV_CONF + ",exclude_after=1", "--local-addr", net.addr(i),
                    "--max-restarts", "2"] + FAST + [FLAKY, str(work)]
            with open(outs[i], "wb") as out:
                procs[i] = net.popen(i, argv, stdout=out, stderr=out,
                                     env=clean_env(NODE="h%d" % i, BAD_NODE="1" if bad else "0"))

        def said(i):
            with open(outs[i]) as f:
                return f.read()

        start(0, False)
        start(1, True)
        for i in (0, 1):
            wait_for(lambda: "round 0 done" in said(i) or "rendezvous round 0" in said(i), what="round 0",
                     explain=lambda: said(0) + said(1))
        start(2, False)
        wait_for(lambda: "waits as a spare" in said(2), what="the spare's narration", explain=lambda: said(2))
        (work / "go").touch()
        assert procs[1].wait(60) == EXCLUDED, said(1)
        assert "host %s leaves run 'netbad'" % net.addr(1) in said(1), said(1)
        wait_for(lambda: "restarting the worker group (1/2)" in said(0), what="host 0's restart",
                 explain=lambda: said(0))
        (work / "ok").touch()
        assert procs[0].wait(60) == 0, said(0)
        assert procs[2].wait(60) == 0, said(2)
        assert "spare %s steps in" % net.addr(2) in said(2), said(2)
        assert sorted(f for f in os.listdir(str(work)) if f.startswith("done_")) == ["done_h0_0_2", "done_h2_1_2"]


def test_settings_and_exclusion_on_etcd(etcd_binary, tmp_path):
    """The run's settings record and an exclusion work the same over etcd (compare_set, check, get)."""
    from etcd_cluster import EtcdCluster
    with EtcdCluster(etcd_binary, tmp_path, size=1) as cluster:
        handlers = []
        try:
            def handler(addr, job, **conf):
                params = rendezvous.RendezvousParameters("etcd", cluster.endpoints[0], "etcdrun", 1, 1,
                                                         local_addr=addr, job=job, **conf)
                h = rendezvous.get_rendezvous_handler(params)
                handlers.append(h)
                return h
            first = handler("10.0.0.1", {"nnodes": "1", "script (role default)": "t.py [crc32 1]"},
                            exclude_after="1")
            info = first.next_rendezvous()
            assert info.world_size == 1
            with pytest.raises(rendezvous.RendezvousMismatchError, match=r"script \(role default\) t.py a"):
                handler("10.0.0.2", {"nnodes": "1", "script (role default)": "t.py a [crc32 2]"}).next_rendezvous()
            with pytest.raises(rendezvous.RendezvousExcludedError):
                first.note_root_cause("rank 0 exited")
            with pytest.raises(rendezvous.RendezvousExcludedError, match="host 10.0.0.1 was excluded"):
                handler("10.0.0.1", {"nnodes": "1", "script (role default)": "t.py [crc32 1]"}).next_rendezvous()
        finally:
            for h in handlers:
                h.close()
