"""rendezvous.py: parameters, rounds, ranks, elasticity, liveness, closing; real processes on 127.0.0.1."""
import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import rendezvous as R
import store as S
from ports import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
NODE = os.path.join(HERE, "rdzv_node.py")
HANG = 60.0                 # hang guard only; nothing here is a timed assert
FAST = ["heartbeat_interval=0.2", "heartbeat_timeout=1.0", "join_timeout=60"]


class Node:
    """A rendezvous node in its own process (tests/rdzv_node.py), driven over stdin/stdout."""

    def __init__(self, backend, endpoint, run_id, min_nodes, max_nodes, local_addr="127.0.0.1", conf=()):
        argv = [sys.executable, NODE, backend, endpoint, run_id, str(min_nodes), str(max_nodes), local_addr]
        self.proc = subprocess.Popen(argv + list(conf), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     universal_newlines=True, bufsize=1)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put({"event": "eof"})

    def send(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def expect(self, event):
        message = self.lines.get(timeout=HANG)
        assert message["event"] == event, message
        return message

    def ask(self, command, event):
        self.send(command)
        return self.expect(event)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def spawn():
    started = []

    def start(*args, **kwargs):
        node = Node(*args, **kwargs)
        started.append(node)
        return node

    try:
        yield start
    finally:
        for node in started:
            node.kill()


def host_and_nodes(spawn, count, min_nodes, max_nodes, run_id="job", conf=(), addrs=None):
    """A store-hosting node that also joins, plus count-1 client nodes; returns them, host first."""
    first = spawn("c10d", "127.0.0.1:0", run_id, min_nodes, max_nodes,
                  local_addr=(addrs or {}).get(0, "127.0.0.1"), conf=["is_host=1"] + list(conf))
    port = first.expect("ready")["port"]
    nodes = [first] + [spawn("c10d", "127.0.0.1:%d" % port, run_id, min_nodes, max_nodes,
                             local_addr=(addrs or {}).get(i, "127.0.0.1"), conf=["is_host=0"] + list(conf))
                       for i in range(1, count)]
    for node in nodes[1:]:
        node.expect("ready")
    return nodes, port


def join(nodes):
    for node in nodes:
        node.send("next")
    return [node.expect("round") for node in nodes]


def check_round(rounds, world_size):
    assert sorted(r["rank"] for r in rounds) == list(range(world_size))
    assert {r["world_size"] for r in rounds} == {world_size}
    assert len({(r["round"], r["master_addr"], r["master_port"]) for r in rounds}) == 1


# ------------------------------------------------------------------------------------- parameters

@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="zookeeper"), "backend 'zookeeper' is unknown"),
    (dict(run_id=""), "run_id"),
    (dict(min_nodes=0), "min_nodes=0"),
    (dict(min_nodes=3, max_nodes=2), "max_nodes=2 is less than min_nodes=3"),
    (dict(join_timeout="soon"), "join_timeout='soon' is not a number"),
    (dict(last_call_timeout=-1), "last_call_timeout=-1 must be a number of seconds > 0"),
    (dict(join_timeout=1e300), "join_timeout=1e+300 must be a number of seconds > 0 and at most"),
    (dict(keep_alive_interval=1, keep_alive_max_attempt=10 ** 9), "heartbeat_timeout=1000000000"),
    (dict(heartbeat_interval=5, heartbeat_timeout=2), "heartbeat_timeout=2 must exceed heartbeat_interval=5"),
    (dict(is_host="maybe"), "is_host='maybe' is not a boolean"),
    (dict(endpoint="host:http"), "port 'http' is not a number"),
    (dict(endpoint="host:70000"), "port 70000 is outside"),
    (dict(endpoint="[::1:29400"), "missing ']'"),
    (dict(endpoint=":29400"), "has no host"),
    (dict(backend="static", min_nodes=2, max_nodes=2), "needs rdzv conf rank"),
    (dict(backend="static", min_nodes=2, max_nodes=2, rank=2), "rank=2 must be below"),
    (dict(backend="static", min_nodes=1, max_nodes=2, rank=0), "fixed node count"),
    (dict(rank=1), "only for the static backend"),
    (dict(endpoint="tcp://127.0.0.1:1234"), "is not HOST[:PORT]"),
    (dict(endpoint="127.0.0.1:1234,127.0.0.1:1235"), "is not HOST[:PORT]"),
    (dict(endpoint="127.0.0.1:1234:"), "is not HOST[:PORT]"),
    (dict(endpoint="[node1]:1234"), "'node1' is not an IPv6 address"),
    (dict(endpoint="no de:1234"), "host 'no de' is not a host name"),
    (dict(backend="etcd", endpoint="http://127.0.0.1:2379", token_file=__file__), "token_file is not for the etcd"),
    (dict(keep_alive_max_attempt=1), "keep_alive_max_attempt=1 must be an integer >= 2"),
    (dict(timeout="soon"), "join_timeout='soon' is not a number"),
])
def test_bad_parameters_raise_one_line_value_errors(kwargs, message):
    args = dict(backend="c10d", endpoint="127.0.0.1:29400", run_id="job", min_nodes=1, max_nodes=2)
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        R.RendezvousParameters(**args)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_conf_keys_are_ignored_with_a_warning_naming_them(caplog):
    # torch ignores keys it does not know; a warning still shows a misspelt one
    with caplog.at_level("WARNING", logger=R.__name__):
        p = R.RendezvousParameters("c10d", "127.0.0.1:29400", "job", 1, 2, joint_timeout="3", foo="x")
    assert p.ignored_keys == ["foo", "joint_timeout"]
    assert p.join_timeout == 600.0
    assert p.get("foo") == "x"
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and "'joint_timeout'" in warned[1] and "'foo'" in warned[0]


def test_torch_timeout_key_sets_the_join_timeout_unless_join_timeout_is_given():
    p = R.RendezvousParameters("c10d", "127.0.0.1:29400", "job", 1, 2, timeout="5")
    assert p.join_timeout == 5.0 and p.ignored_keys == []
    p = R.RendezvousParameters("c10d", "127.0.0.1:29400", "job", 1, 2, timeout="5", join_timeout="7")
    assert p.join_timeout == 7.0


def test_etcd_ignores_is_host_as_torch_does(caplog):
    with caplog.at_level("WARNING", logger=R.__name__):
        p = R.RendezvousParameters("etcd", "http://127.0.0.1:2379", "job", 1, 2, is_host="1")
    assert p.is_host is None and "is_host" in p.ignored_keys
    assert not caplog.records


@pytest.mark.parametrize("endpoint, host, port", [
    ("node1", "node1", 29400), ("node1:1234", "node1", 1234), ("[::1]:1234", "::1", 1234),
    ("[fe80::1]", "fe80::1", 29400), ("::1", "::1", 29400), ("", "127.0.0.1", 29400), (" 10.0.0.1:0 ", "10.0.0.1", 0),
])
def test_endpoint_parsing(endpoint, host, port):
    params = R.RendezvousParameters("c10d", endpoint, "job", 1, 1, heartbeat_interval="1", join_timeout=3)
    assert (params.host, params.port) == (host, port)
    assert params.heartbeat_interval == 1.0 and params.join_timeout == 3.0


def test_torch_keep_alive_settings_set_the_heartbeat():
    params = R.RendezvousParameters("c10d", "127.0.0.1:1", "job", 1, 1, keep_alive_interval="2",
                                    keep_alive_max_attempt="4")
    assert (params.heartbeat_interval, params.heartbeat_timeout) == (2.0, 8.0)
    params = R.RendezvousParameters("c10d", "127.0.0.1:1", "job", 1, 1, keep_alive_interval=20)
    assert (params.heartbeat_interval, params.heartbeat_timeout) == (20.0, 60.0)   # torch's 3 attempts


def _own_address():
    """This machine's address on its default route (a UDP connect sends nothing), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_an_endpoint_naming_one_of_this_machines_addresses_is_served_here():
    address = _own_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    assert R._is_local_host(address, None)
    assert not R._is_local_host("192.0.2.77", None)     # TEST-NET: nobody's interface
    assert not R._is_local_host("2001:db8::77", None)


def test_error_classes():
    assert issubclass(R.RendezvousTimeoutError, (R.RendezvousError, TimeoutError))
    assert issubclass(R.RendezvousTimeoutError, TimeoutError)
    assert issubclass(R.RendezvousConnectionError, ConnectionError)
    assert issubclass(R.RendezvousClosedError, R.RendezvousError)


def test_etcd_unreachable_is_a_clear_error():
    params = R.RendezvousParameters("etcd", "http://127.0.0.1:%d" % free_port(), "job", 1, 1, join_timeout=1)
    with pytest.raises((R.RendezvousConnectionError, R.RendezvousError), match="etcd"):
        R.get_rendezvous_handler(params)


# ------------------------------------------------------------------------------------- processes

def test_two_nodes_c10d_ranks_sorted_by_address(spawn):
    nodes, _ = host_and_nodes(spawn, 2, 2, 2, addrs={0: "127.0.0.2", 1: "127.0.0.1"})
    rounds = join(nodes)
    check_round(rounds, 2)
    assert [r["rank"] for r in rounds] == [1, 0]            # 127.0.0.1 sorts first
    assert rounds[0]["master_addr"] == "127.0.0.1" and rounds[0]["round"] == 0
    assert 0 < rounds[0]["master_port"] < 65536


def test_eight_nodes_and_a_second_round_keep_ranks(spawn):
    nodes, _ = host_and_nodes(spawn, 8, 8, 8)
    first = join(nodes)
    check_round(first, 8)
    second = join(nodes)                 # everyone comes back: a new round, same ranks
    check_round(second, 8)
    assert second[0]["round"] > first[0]["round"]
    assert [r["rank"] for r in first] == [r["rank"] for r in second]


def test_static_two_nodes(spawn):
    endpoint = "127.0.0.1:%d" % free_port()
    nodes = [spawn("static", endpoint, "job", 2, 2, conf=["rank=%d" % rank]) for rank in (1, 0)]
    for node in nodes:
        node.expect("ready")
    rounds = join(nodes)
    assert [r["rank"] for r in rounds] == [1, 0]
    check_round(rounds, 2)
    assert rounds[0]["master_addr"] == "127.0.0.1"


def test_closed_run(spawn):
    nodes, port = host_and_nodes(spawn, 2, 2, 2)
    check_round(join(nodes), 2)
    nodes[1].ask("close", "closed")
    assert nodes[0].ask("closed", "is_closed")["value"] is True
    late = spawn("c10d", "127.0.0.1:%d" % port, "job", 2, 2, conf=["is_host=0"])
    late.expect("ready")
    error = late.ask("next", "error")      # never joined: a reused run id, which must not pass silently
    assert error["type"] == "RendezvousClosedError" and "closed before this node joined" in error["message"]
    error = nodes[0].ask("next", "error")  # a member: the normal end of its run
    assert error["type"] == "RendezvousClosedError" and "before this node joined" not in error["message"]


def test_closing_wakes_a_waiting_node(spawn):
    nodes, port = host_and_nodes(spawn, 2, 3, 3)
    nodes[0].send("next")                 # waits: 1 of 3
    nodes[1].ask("close", "closed")
    assert nodes[0].expect("error")["type"] == "RendezvousClosedError"


# ------------------------------------------------------------------------------------- elasticity, liveness

@pytest.fixture
def server():
    """A store server in this process: nodes in other processes use it, so any node may die."""
    srv = S.StoreServer("127.0.0.1", 0).start()
    try:
        yield srv
    finally:
        srv.stop()


def clients(spawn, port, count, min_nodes, max_nodes, run_id="job", conf=()):
    nodes = [spawn("c10d", "127.0.0.1:%d" % port, run_id, min_nodes, max_nodes, conf=["is_host=0"] + list(conf))
             for _ in range(count)]
    for node in nodes:
        node.ready = node.expect("ready")
    return nodes


def test_late_joiner_is_counted_and_gets_in_on_restart(spawn):
    conf = FAST + ["last_call_timeout=0.5"]
    nodes, port = host_and_nodes(spawn, 2, 2, 3, conf=conf)
    check_round(join(nodes), 2)
    late = clients(spawn, port, 1, 2, 3, conf=conf)[0]
    late.send("next")
    assert nodes[1].ask("until_waiting", "waiting")["n"] == 1
    rounds = join(nodes) + [late.expect("round")]
    check_round(rounds, 3)
    assert rounds[0]["round"] == 1


def test_node_killed_after_the_round_survivors_reform(spawn, server):
    conf = FAST + ["last_call_timeout=0.3"]
    nodes = clients(spawn, server.port, 3, 2, 3, conf=conf)
    check_round(join(nodes), 3)
    nodes[1].kill()
    for node in (nodes[0], nodes[2]):
        node.ask("broken", "broken")
    rounds = join([nodes[0], nodes[2]])
    check_round(rounds, 2)


def test_member_killed_is_known_at_once_not_after_the_heartbeat_timeout(spawn, server):
    """A member's process dies: its store connection closes, its heartbeat key vanishes, and its
    ring neighbour (parked on that key) marks the round broken, which wakes every survivor. The
    heartbeat timeout here would take minutes, so only the closed connection can do it in time."""
    conf = ["heartbeat_interval=0.2", "heartbeat_timeout=600", "join_timeout=60", "last_call_timeout=0.3"]
    nodes = clients(spawn, server.port, 3, 2, 3, conf=conf)
    check_round(join(nodes), 3)
    hb = ["elastic/job/0/hb/%d" % rank for rank in range(3)]
    with S.TCPStore("127.0.0.1", server.port, timeout=HANG) as probe:
        probe.wait(hb, HANG)
        # a few beats each: every member has seen its neighbour's key and watches it (a key that
        # vanished before its watcher first saw it is told from one not yet made only by silence)
        while min(int(v) for v in probe.multi_get(hb)) < 3:
            time.sleep(0.05)
    nodes[1].kill()
    for node in (nodes[0], nodes[2]):
        node.ask("broken", "broken")
    check_round(join([nodes[0], nodes[2]]), 2)


def test_joiner_killed_during_the_last_call_is_left_out(spawn, server):
    """A node that joins and dies while the closer's last call runs is not made a member (torch
    drops it too): the round forms with the live nodes instead of breaking as soon as it starts.
    (In the first round its alive key may not exist yet: the closer goes by its silence.)"""
    conf = FAST + ["last_call_timeout=3"]
    nodes = clients(spawn, server.port, 3, 1, 4, conf=conf)
    nodes[0].send("next")
    with S.TCPStore("127.0.0.1", server.port, timeout=HANG) as probe:
        probe.wait(["elastic/job/0/closer"], HANG)          # slot 1 = min_nodes: the last call is open
        nodes[1].send("next")
        probe.wait(["elastic/job/0/node/2"], HANG)          # the second joined ...
        nodes[1].kill()                                     # ... and dies before the round closes
        nodes[2].send("next")
        probe.wait(["elastic/job/0/node/3"], HANG)
        rounds = [node.expect("round") for node in (nodes[0], nodes[2])]
        check_round(rounds, 2)
        members = json.loads(probe.get("elastic/job/0/members"))
    assert nodes[1].ready["id"] not in [m[1] for m in members]


def test_joiner_hung_during_the_last_call_is_left_out(spawn, server):
    """A joiner that stops beating (stopped, cut off) is left out once the closer has watched it
    stay silent for heartbeat_timeout, measured by the closer's own clock."""
    conf = FAST + ["last_call_timeout=4"]
    nodes = clients(spawn, server.port, 2, 1, 3, conf=conf)
    nodes[0].send("next")
    with S.TCPStore("127.0.0.1", server.port, timeout=HANG) as probe:
        probe.wait(["elastic/job/0/closer"], HANG)
        nodes[1].send("next")
        probe.wait(["elastic/job/0/node/2"], HANG)
        os.kill(nodes[1].proc.pid, signal.SIGSTOP)          # alive, connected, silent
        alone = nodes[0].expect("round")
    assert (alone["world_size"], alone["rank"]) == (1, 0)


def test_dead_spare_does_not_displace_a_live_member(spawn, server):
    """min == max: a spare that waited for the next round and died is not taken into it in place
    of a live member that comes back a moment after the closer."""
    members = clients(spawn, server.port, 2, 2, 2, conf=FAST)
    check_round(join(members), 2)
    spare = clients(spawn, server.port, 1, 2, 2, conf=FAST)[0]
    spare.send("next")
    with S.TCPStore("127.0.0.1", server.port, timeout=HANG) as probe:
        probe.wait(["elastic/job/1/node/1"], HANG)          # the spare waits in round 1
        spare.kill()
        while probe.check(["elastic/job/1/alive/1"]):       # gone with its connection, at once
            time.sleep(0.01)
        members[0].send("next")                             # its workers failed: it comes back first
        probe.wait(["elastic/job/1/closer"], HANG)          # and closes round 1
        members[1].send("next")                             # the other saw the round break
        first = members[0].expect("round")
        chosen = json.loads(probe.get("elastic/job/%d/members" % first["round"]))
        assert sorted(m[1] for m in chosen) == sorted(node.ready["id"] for node in members)
        check_round([first, members[1].expect("round")], 2)


def test_member_leaving_breaks_the_round_for_the_others(spawn, server):
    nodes = clients(spawn, server.port, 2, 2, 2, conf=FAST)
    check_round(join(nodes), 2)
    nodes[1].ask("shutdown", "shutdown")
    nodes[0].ask("broken", "broken")


def test_a_finished_member_leaving_breaks_nothing_and_a_later_death_is_still_seen(spawn, server):
    """Rank 1 says it finished and leaves: rank 0, which watched it, watches rank 2 instead; when
    rank 2 dies the round breaks for that death (not for rank 1's leaving)."""
    # only a vanished key can tell a death within the test (600 s of silence would)
    conf = ["heartbeat_interval=0.2", "heartbeat_timeout=600", "join_timeout=60", "last_call_timeout=0.3"]
    nodes = clients(spawn, server.port, 3, 3, 3, conf=conf)
    rounds = join(nodes)
    check_round(rounds, 3)
    nodes = [nodes[[r["rank"] for r in rounds].index(rank)] for rank in range(3)]   # by rank
    hb = ["elastic/job/0/hb/%d" % rank for rank in range(3)]
    with S.TCPStore("127.0.0.1", server.port, timeout=HANG) as probe:
        probe.wait(hb, HANG)
        while min(int(v) for v in probe.multi_get(hb)) < 3:    # each one watches its neighbour's key
            time.sleep(0.05)
        nodes[1].ask("finished", "finished")
        nodes[1].ask("shutdown", "shutdown")
        nodes[2].kill()
        nodes[0].ask("broken", "broken")
        why = probe.get("elastic/job/0/broken_why").decode()
        assert "rank 2" in why, why


def test_a_frozen_store_host_does_not_blame_its_peer_for_its_own_silence(spawn):
    """The node that hosts the store is stopped (SIGSTOP) for several heartbeat timeouts. Its peer
    is stopped too, a little before, and continued a little after: so when the host runs again,
    the peer has not beaten for longer than the timeout by the wall clock, but for only a moment
    of the host's own running time. A node counts silence only over time it ran itself."""
    conf = ["heartbeat_interval=0.25", "heartbeat_timeout=2.5", "join_timeout=60", "last_call_timeout=0.3"]
    nodes, port = host_and_nodes(spawn, 2, 2, 2, conf=conf)
    check_round(join(nodes), 2)
    host, peer = nodes[0].proc.pid, nodes[1].proc.pid
    hb = ["elastic/job/0/hb/0", "elastic/job/0/hb/1"]
    with S.TCPStore("127.0.0.1", port, timeout=HANG) as probe:
        probe.wait(hb, HANG)
        while min(int(v) for v in probe.multi_get(hb)) < 4:     # each has watched the other a while
            time.sleep(0.05)
        os.kill(peer, signal.SIGSTOP)
        os.kill(host, signal.SIGSTOP)
        try:
            time.sleep(6.0)                # the freeze itself
        finally:
            os.kill(host, signal.SIGCONT)
            time.sleep(0.3)                # the host runs alone: its peer's silence starts to count
            os.kill(peer, signal.SIGCONT)
        after = [int(v) for v in probe.multi_get(hb)]
        broken = "elastic/job/0/broken"
        while min(int(v) - a for v, a in zip(probe.multi_get(hb), after)) < 8 and not probe.check([broken]):
            time.sleep(0.05)                # both beat on (or the round broke, and beats stopped)
        assert not probe.check([broken]), probe.get("elastic/job/0/broken_why")
    for node in nodes:
        assert node.ask("isbroken", "isbroken")["value"] is False


def test_store_host_dying_gives_connection_errors_not_hangs(spawn):
    conf = FAST + ["last_call_timeout=0.3"]
    host = spawn("c10d", "127.0.0.1:0", "job", 2, 3, conf=["is_host=1"] + conf)   # serves, never joins
    port = host.expect("ready")["port"]
    members = clients(spawn, port, 2, 2, 3, conf=conf)
    check_round(join(members), 2)
    waiting = clients(spawn, port, 1, 2, 3, conf=conf)[0]
    waiting.send("next")
    assert members[0].ask("until_waiting", "waiting")["n"] == 1
    host.kill()
    members[0].ask("broken", "broken")
    assert members[0].ask("next", "error")["type"] == "RendezvousConnectionError"
    assert waiting.expect("error")["type"] == "RendezvousConnectionError"


# ------------------------------------------------------------------------------------- in-process nodes

def make_handlers(port, run_id, count, min_nodes, max_nodes, **conf):
    return [R.RendezvousHandler(S.TCPStore("127.0.0.1", port, timeout=HANG),
                                R.RendezvousParameters("c10d", "127.0.0.1:%d" % port, run_id, min_nodes, max_nodes,
                                                       local_addr="127.0.0.1", **conf))
            for _ in range(count)]


def join_threads(handlers):
    results = [None] * len(handlers)

    def run(i):
        try:
            results[i] = handlers[i].next_rendezvous()
        except Exception as e:  # handed to the test thread
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(handlers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG)
    return results


@pytest.fixture
def closing():
    handlers = []
    try:
        yield handlers
    finally:
        for h in handlers:
            h.close()


def test_sixty_four_nodes(server, closing):
    closing.extend(make_handlers(server.port, "big", 64, 64, 64))
    infos = join_threads(closing)
    assert sorted(i.rank for i in infos) == list(range(64))
    assert {(i.world_size, i.master_port, i.round) for i in infos} == {(64, infos[0].master_port, 0)}
    infos[5].store.set("hello", "x")                  # the round's store is shared by its members
    assert infos[40].store.get("hello") == b"x"


def test_run_ids_on_one_store_never_mix(server, closing):
    runs = ["a", "b", "a/0", "a%2F0"]                 # "a/0" must not collide with round keys of "a"
    by_run = {run: make_handlers(server.port, run, 2, 2, 2) for run in runs}
    for hs in by_run.values():
        closing.extend(hs)
    infos = join_threads(closing)
    for k, run in enumerate(runs):
        mine = infos[2 * k:2 * k + 2]
        assert sorted(i.rank for i in mine) == [0, 1], run
        assert {m[1] for m in mine[0].members} == {h.node_id for h in by_run[run]}


def test_timeout_names_joined_and_needed(server, closing):
    closing.extend(make_handlers(server.port, "short", 1, 2, 3, join_timeout=0.5))
    with pytest.raises(R.RendezvousTimeoutError, match="joined 1 of 2 needed"):
        closing[0].next_rendezvous()


def test_token_file_reaches_the_store(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    params = R.RendezvousParameters("c10d", "127.0.0.1:0", "tok", 1, 1, is_host=1, token_file=str(token))
    host = R.get_rendezvous_handler(params)
    try:
        assert host.next_rendezvous().world_size == 1
        port = host.store.port
        bad = R.RendezvousParameters("c10d", "127.0.0.1:%d" % port, "tok", 1, 1, is_host=0, join_timeout=5)
        with pytest.raises(R.RendezvousError, match="token"):
            R.get_rendezvous_handler(bad)
        good = R.RendezvousParameters("c10d", "127.0.0.1:%d" % port, "tok", 1, 1, is_host=0,
                                      token_file=str(token))
        R.get_rendezvous_handler(good).close()
    finally:
        host.close()
    with pytest.raises(ValueError, match="token_file"):
        R.RendezvousParameters("c10d", "127.0.0.1:1", "tok", 1, 1, token_file=str(tmp_path / "missing"))


def test_closer_killed_during_the_last_call_another_node_closes(spawn, server):
    conf = FAST + ["last_call_timeout=3"]
    nodes = clients(spawn, server.port, 3, 2, 4, conf=conf)
    for node in nodes:
        node.send("next")
    with S.TCPStore("127.0.0.1", server.port, timeout=HANG) as probe:
        probe.wait(["elastic/job/0/node/3", "elastic/job/0/closer"], HANG)
        closer = probe.get("elastic/job/0/closer").decode()
    victim = [n for n in nodes if n.ready["id"] == closer][0]
    victim.kill()
    survivors = [n for n in nodes if n is not victim]
    rounds = [n.expect("round") for n in survivors]
    if rounds[0]["world_size"] == 3:      # loaded machine: the round closed before the kill landed
        for node in survivors:
            node.ask("broken", "broken")
        rounds = join(survivors)
    check_round(rounds, 2)


# ------------------------------------------------------------------------------------- etcd backend

def test_etcd_backend_forms_rounds_and_sees_a_killed_member(spawn, etcd_binary, tmp_path):
    sys.path.insert(0, HERE)
    from etcd_cluster import EtcdCluster
    with EtcdCluster(etcd_binary, tmp_path, size=1) as cluster:
        endpoint = ",".join(cluster.endpoints)
        conf = FAST + ["last_call_timeout=0.3"]
        nodes = [spawn("etcd", endpoint, "job", 2, 3, conf=conf) for _ in range(3)]
        for node in nodes:
            node.expect("ready")
        check_round(join(nodes), 3)
        nodes[2].kill()
        for node in nodes[:2]:
            node.ask("broken", "broken")
        check_round(join(nodes[:2]), 2)
        nodes[0].ask("close", "closed")
        assert nodes[1].ask("next", "error")["type"] == "RendezvousClosedError"


def test_etcd_dead_spare_does_not_displace_a_live_member(spawn, etcd_binary, tmp_path):
    """The dead-spare case on etcd: the spare's alive key is under its lease, gone a TTL after it."""
    sys.path.insert(0, HERE)
    from etcd_cluster import EtcdCluster
    with EtcdCluster(etcd_binary, tmp_path, size=1) as cluster:
        endpoint = ",".join(cluster.endpoints)
        members = [spawn("etcd", endpoint, "job", 2, 2, conf=FAST) for _ in range(2)]
        for node in members:
            node.ready = node.expect("ready")
        check_round(join(members), 2)
        spare = spawn("etcd", endpoint, "job", 2, 2, conf=FAST)
        spare.expect("ready")
        spare.send("next")
        with R.EtcdStore(cluster.endpoints, timeout=HANG) as probe:
            probe.wait(["elastic/job/1/node/1"], HANG)
            spare.kill()
            while probe.check(["elastic/job/1/alive/1"]):   # the lease expires (ttl 1 s)
                time.sleep(0.05)
            members[0].send("next")
            probe.wait(["elastic/job/1/closer"], HANG)
            members[1].send("next")
            first = members[0].expect("round")
            chosen = json.loads(probe.get("elastic/job/%d/members" % first["round"]))
            assert sorted(m[1] for m in chosen) == sorted(node.ready["id"] for node in members)
            check_round([first, members[1].expect("round")], 2)


def test_waiting_node_forms_a_round_when_every_running_member_died(spawn, server):
    members = clients(spawn, server.port, 2, 2, 2, conf=FAST)
    check_round(join(members), 2)
    late = clients(spawn, server.port, 1, 1, 2, conf=FAST + ["last_call_timeout=0.3"])[0]
    late.send("next")
    with S.TCPStore("127.0.0.1", server.port, timeout=HANG) as probe:
        probe.wait(["elastic/job/1/closer"], HANG)     # it closes round 1, once round 0 has ended
    assert members[0].ask("waiting", "waiting")["n"] == 0   # round 0 is full: no reason to restart
    for node in members:
        node.kill()
    alone = late.expect("round")
    assert (alone["world_size"], alone["rank"], alone["round"]) == (1, 0, 1)


def test_store_listens_on_the_endpoints_address_when_it_can():
    """An IP endpoint this machine has is the one address the store listens on; a name or an address
    of another machine leaves it on every interface (the other nodes resolve names themselves)."""
    assert R._listen_address("127.0.0.1") == "127.0.0.1"
    assert R._listen_address("localhost") is None
    assert R._listen_address("192.0.2.1") is None      # TEST-NET-1: no machine has it
    params = R.RendezvousParameters("c10d", "127.0.0.1:0", "bind", 1, 1, is_host=1)
    handler = R.get_rendezvous_handler(params)
    try:
        with open("/proc/net/tcp") as f:
            rows = [line.split() for line in f.read().splitlines()[1:]]
        listening = {r[1].split(":")[0] for r in rows
                     if r[3] == "0A" and int(r[1].split(":")[1], 16) == handler._store.port}
        assert listening == {"0100007F"}
    finally:
        handler.close()


def test_a_token_is_a_secret_kept_out_of_the_parameters_repr():
    params = R.RendezvousParameters("c10d", "127.0.0.1:0", "t", 1, 1, token="s3cret", is_host=1)
    assert "s3cret" not in repr(params) and params.token == "s3cret"
    with pytest.raises(ValueError, match="not both"):
        R.RendezvousParameters("c10d", "127.0.0.1:0", "t", 1, 1, token="s", token_file=__file__)


# ------------------------------------------------------------------------------------- narration

class Said(logging.Handler):
    """The rendezvous logger's INFO lines, as (time, text), with a wait for one that matches."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines, self.cond = [], threading.Condition()

    def emit(self, record):
        with self.cond:
            self.lines.append((record.created, record.getMessage()))
            self.cond.notify_all()

    def wait_for(self, pattern):
        """The first line matching `pattern` (a regex): its match object."""
        with self.cond:
            ok = self.cond.wait_for(lambda: any(re.search(pattern, text) for _, text in self.lines), HANG)
            assert ok, "no line matching %r in %r" % (pattern, [text for _, text in self.lines])
            return next(re.search(pattern, text) for _, text in self.lines if re.search(pattern, text))

    def count(self, pattern, n):
        """Wait until `n` lines match `pattern`."""
        with self.cond:
            assert self.cond.wait_for(
                lambda: sum(1 for _, text in self.lines if re.search(pattern, text)) >= n, HANG), self.lines

    def paced(self, pattern):
        """No two lines matching `pattern` within a second of each other."""
        times = sorted(t for t, text in self.lines if re.search(pattern, text))
        return all(b - a >= 0.99 for a, b in zip(times, times[1:]))


@pytest.fixture
def said():
    handler = Said()
    logger = logging.getLogger(R.__name__)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def start_joining(handler):
    """next_rendezvous() in a thread; returns a list that receives its result (or its error, when
    the test ends it by closing the handler)."""
    result = []

    def join():
        try:
            result.append(handler.next_rendezvous())
        except R.RendezvousError as e:
            result.append(e)
    threading.Thread(target=join, daemon=True).start()
    return result


def test_a_wait_for_nodes_says_how_many_joined_and_how_long_is_left(server, closing, said):
    closing.extend(make_handlers(server.port, "narrated", 2, 2, 2, join_timeout=600))
    start_joining(closing[0])
    match = said.wait_for(r"waiting for nodes: (\d+) of 2 joined \(min 2\), (\d+) s left")
    assert match.group(1) == "1" and 560 <= int(match.group(2)) <= 600
    start_joining(closing[1])
    said.count(r"rendezvous round 0 of run 'narrated' complete", 2)
    assert said.paced("waiting for")


def test_a_long_wait_for_nodes_speaks_again_at_a_human_pace(server, closing, said):
    closing.extend(make_handlers(server.port, "paced", 2, 2, 2, join_timeout=600))
    start_joining(closing[0])
    said.wait_for(r"waiting for nodes: 1 of 2 joined")
    with said.cond:
        said.cond.wait_for(lambda: len(said.lines) >= 2, HANG)   # the second line, ~10 s later
    texts = [text for _, text in said.lines if "waiting" in text]
    assert all(t.startswith("waiting for nodes: 1 of 2 joined (min 2)") for t in texts), texts
    left = [int(re.search(r"(\d+) s left", t).group(1)) for t in texts]
    assert left[0] > left[1]
    assert said.paced("waiting for")


def test_the_last_call_says_how_many_joined_and_when_it_closes(server, closing, said):
    closing.extend(make_handlers(server.port, "last", 3, 1, 3, last_call_timeout=30, join_timeout=600))
    start_joining(closing[0])                         # slot 1 = min_nodes: the closer, in its last call
    match = said.wait_for(r"last call: (\d+) of 1:3 joined, closing in (\d+) s")
    assert match.group(1) == "1" and 20 <= int(match.group(2)) <= 30
    for handler in closing[1:]:                       # slot 3 = max_nodes: the round closes at once
        start_joining(handler)
    said.count(r"rendezvous round 0 of run 'last' complete: rank \d of 3", 3)
    assert said.paced("last call")


def test_a_broken_round_names_the_silent_node_by_its_host_name(spawn, server, closing, said, monkeypatch):
    conf = FAST + ["last_call_timeout=0.3"]
    closing.extend(make_handlers(server.port, "job", 1, 2, 2, heartbeat_interval=0.2, heartbeat_timeout=1.0))
    monkeypatch.setenv("RDZV_NODE_HOST", "gpu07")
    other = clients(spawn, server.port, 1, 2, 2, conf=conf)[0]
    start_joining(closing[0])
    other.send("next")
    other.expect("round")
    said.wait_for(r"rendezvous round 0 of run 'job' complete")
    with S.TCPStore("127.0.0.1", server.port, timeout=HANG) as probe:
        probe.wait(["elastic/job/0/hb/0", "elastic/job/0/hb/1"], HANG)
    os.kill(other.proc.pid, signal.SIGSTOP)           # alive, connected, silent
    match = said.wait_for(r"round 0 broken: node (\S+) \(rank \d\) silent for (\d+) s; waiting for a new round")
    assert match.group(1) == "gpu07" and int(match.group(2)) >= 1
