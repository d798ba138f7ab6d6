"""PyTorch's test/distributed/test_store.py (the TCPStore and PrefixStore cases), run against store.py.

"Change one word": ``torch.distributed`` becomes our ``store`` module; each case keeps torch's class
and test name and asserts what torch asserts. torch's error classes map to ours: DistError and
DistStoreError -> StoreError, DistNetworkError -> StoreConnectionError. The harness helper
``create_tcp_store`` (torch's test utility, not user API) keeps torch's call: ``TCPStore(host, 0, 1, True, timeout)``;
everything a case body calls is called exactly as torch's case calls it, so an API gap shows as a
failure of that case.

Not ported (skipped, with the reason): FileStore, HashStore and their prefix variants, libuv, RPC,
torch's URL rendezvous parsing and init_process_group internals, and torch's C++ wire protocol.
"""
import os
import signal
import socket
import threading
import unittest
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta


import store as dist
from store import PrefixStore, StoreConnectionError, StoreError, TCPStore

DistError = DistStoreError = StoreError
DistNetworkError = StoreConnectionError
DEFAULT_HOSTNAME = "127.0.0.1"   # torch says "localhost"; the project's tests never resolve names



def create_tcp_store(addr=DEFAULT_HOSTNAME, world_size=1, wait_for_workers=True, timeout=timedelta(minutes=5)):
    """torch's test helper: a master store on a free port."""
    return TCPStore(addr, 0, world_size, True, timeout, wait_for_workers=wait_for_workers)


def find_free_port():
    with socket.socket() as s:
        s.bind((DEFAULT_HOSTNAME, 0))
        return s.getsockname()[1]


class _Stores:
    """Closes every store a case made (torch relies on its destructor)."""

    def setUp(self):
        super().setUp()
        self._made = []

    def tearDown(self):
        for s in reversed(self._made):
            try:
                s.close()
            except Exception:
                pass
        super().tearDown()

    def keep(self, s):
        self._made.append(s)
        return s


class StoreTestBase(_Stores):
    def _create_store(self):
        raise NotImplementedError

    def test_set_get_check(self):
        fs = self._create_store()
        fs.add("key", 1)
        fs.add("key", 2)
        fs.add("key", 3)
        fs.set("key0", "value0")
        fs.add("key3", 1)
        fs.set("key1", "value1")
        fs.add("key3", 2)
        fs.set("key2", "value2")
        for n in (3, 4, 5, 6):
            fs.add("key3", n)
        self.assertEqual(self.num_keys_total, fs.num_keys())
        self.assertEqual(b"6", fs.get("key"))
        self.assertEqual(b"value0", fs.get("key0"))
        self.assertEqual(b"value1", fs.get("key1"))
        self.assertEqual(b"value2", fs.get("key2"))
        self.assertEqual(b"21", fs.get("key3"))
        self.assertTrue(fs.check(["key3"]))
        self.assertFalse(fs.check(["Randomkey3"]))
        fs.set("-key3", "7")
        self.assertEqual(b"7", fs.get("-key3"))
        fs.delete_key("-key3")
        self.assertEqual(self.num_keys_total, fs.num_keys())

    def test_compare_set(self):
        s = self._create_store()
        self.assertEqual(b"wrong_old_value", s.compare_set("cs_key0", "wrong_old_value", "new_value0"))
        s.set("cs_key0", "value0")
        self.assertEqual(b"value0", s.get("cs_key0"))
        self.assertEqual(b"value0", s.compare_set("cs_key0", "wrong_old_value", "new_value0"))
        self.assertEqual(b"value0", s.get("cs_key0"))
        self.assertEqual(b"new_value0", s.compare_set("cs_key0", "value0", "new_value0"))
        self.assertEqual(b"new_value0", s.get("cs_key0"))
        self.assertEqual(b"new_value1", s.compare_set("cs_key1", "", "new_value1"))
        self.assertEqual(b"new_value1", s.get("cs_key1"))

    def test_simple_wait(self):
        fs = self._create_store()
        with self.assertRaisesRegex(RuntimeError, "[t -i]imeout"):
            fs.wait(["bad_key"], timedelta(seconds=0.25))
        fs.add("good_key", 1)
        fs.wait(["good_key"])

    def test_append(self):
        s = self._create_store()
        if not s.has_extended_api():
            return
        s.set("foo", "po")
        s.append("foo", "tato")
        s.append("bar", "po")
        s.append("bar", "tato")
        self.assertEqual(b"potato", s.get("foo"))
        self.assertEqual(b"potato", s.get("bar"))

    def _create_store_or_skip_if_no_queues(self):
        s = self._create_store()
        try:
            s.queue_push("test_queue_support", "1")
        except NotImplementedError:
            self.skipTest("Store does not support queues")
        return s

    def test_queues(self):
        s = self._create_store_or_skip_if_no_queues()
        self.assertFalse(s.check(["foo"]))
        self.assertEqual(0, s.queue_len("foo"))
        s.queue_push("foo", "1")
        s.queue_push("foo", "2")
        self.assertTrue(s.check(["foo"]))
        self.assertEqual(2, s.queue_len("foo"))
        s.wait(["foo"])
        self.assertEqual(b"1", s.queue_pop("foo"))
        self.assertEqual(b"2", s.queue_pop("foo"))
        self.assertFalse(s.check(["foo"]))
        self.assertEqual(0, s.queue_len("foo"))

    def test_queues_nonblocking(self):
        s = self._create_store_or_skip_if_no_queues()
        with self.assertRaisesRegex(dist.QueueEmptyError, "empty"):
            s.queue_pop("foo", block=False)
        s.queue_push("foo", "a")
        self.assertEqual(b"a", s.queue_pop("foo", block=False))

    def test_queues_bidirectional(self):
        s = self._create_store_or_skip_if_no_queues()

        def side_a():
            mine = self.keep(s.clone())
            mine.queue_push("a", "a1")
            self.assertEqual(b"b1", mine.queue_pop("b"))

        def side_b():
            mine = self.keep(s.clone())
            self.assertEqual(b"a1", mine.queue_pop("a"))
            mine.queue_push("b", "b1")

        with ThreadPoolExecutor(max_workers=2) as pool:
            for fut in [pool.submit(side_a), pool.submit(side_b)]:
                fut.result()

    def test_queues_timeout(self):
        s = self._create_store_or_skip_if_no_queues()
        s.set_timeout(timedelta(seconds=0.01))
        with self.assertRaisesRegex(DistStoreError, "timeout"):
            s.queue_pop("non_existant")

    def test_multi_set(self):
        s = self._create_store()
        if not s.has_extended_api():
            return
        s.multi_set(["foo", "bar"], ["po", "tato"])
        self.assertEqual(b"po", s.get("foo"))
        self.assertEqual(b"tato", s.get("bar"))

    def test_multi_get(self):
        s = self._create_store()
        if not s.has_extended_api():
            return
        s.set("foo", "po")
        s.set("bar", "tato")
        v0, v1 = s.multi_get(["foo", "bar"])
        self.assertEqual(b"po", v0)
        self.assertEqual(b"tato", v1)

    def test_clone(self):
        a = self._create_store()
        b = self.keep(a.clone())
        self.assertIsInstance(b, (TCPStore, PrefixStore))   # torch: dist.Store, the common base
        a.set("foo", "bar")
        self.assertEqual(b"bar", b.get("foo"))

    @property
    def num_keys_total(self):
        return 5


class _NotApplicable:
    """A whole torch test class for a store we do not have."""
    why = ""

    def setUp(self):
        super().setUp()
        self.skipTest(self.why)


class FileStoreTest(_NotApplicable, StoreTestBase, unittest.TestCase):
    why = "FileStore is torch's shared-file store; elasticrun has only the TCP store"

    def test_init_pg_and_rpc_with_same_file(self):
        pass

    def test_refcount(self):
        pass


class HashStoreTest(_NotApplicable, StoreTestBase, unittest.TestCase):
    why = "HashStore is torch's in-process store; elasticrun has only the TCP store"


class PrefixFileStoreTest(_NotApplicable, StoreTestBase, unittest.TestCase):
    why = "PrefixStore over FileStore: elasticrun has no FileStore"


class PrefixStoreTest(_Stores, unittest.TestCase):
    def test_get_underlying_store(self):
        # torch loops over TCPStore, HashStore and FileStore; only the TCP one exists here
        tcp_store = self.keep(TCPStore(DEFAULT_HOSTNAME, 0, is_master=True))
        for s in [tcp_store]:   # torch wraps this in subTest, which strict xfail cannot follow
            self.assertEqual(s, PrefixStore("prefix", s).underlying_store)
        with self.assertRaises(ValueError):
            PrefixStore("prefix", None)


class TCPStoreTest(StoreTestBase, unittest.TestCase):
    # torch's TCPStoreTest also asserts `store.libuvBackend == False` (the non-libuv server) in several
    # cases; libuv does not apply to us, so those lines are left out and the rest of each case is kept

    def _create_store(self):
        s = self.keep(create_tcp_store())
        s.set_timeout(timedelta(seconds=300))
        return s

    @property
    def num_keys_total(self):
        return 6

    def test_address_already_in_use(self):
        port = find_free_port()
        with self.assertRaisesRegex(DistNetworkError,
                                    "^The server socket has failed to listen on any local .*%d" % port):
            store1 = self.keep(TCPStore(DEFAULT_HOSTNAME, port, 1, True))  # noqa: F841
            store2 = self.keep(TCPStore(DEFAULT_HOSTNAME, port, 1, True))  # noqa: F841

    def test_multitenancy(self):
        port = find_free_port()
        store1 = self.keep(TCPStore(DEFAULT_HOSTNAME, port, 1, True, multi_tenant=True))  # noqa: F841
        store2 = self.keep(TCPStore(DEFAULT_HOSTNAME, port, 1, True, multi_tenant=True))  # noqa: F841

    def test_repr(self):
        self.skipTest("asserts the layout of torch's C++ objects in repr (TCPClient(SocketImpl(fd=..)), "
                      "TCPServer(port=..)): internals of torch's implementation")

    def test_init_pg_and_rpc_with_same_socket(self):
        self.skipTest("torch RPC and init_process_group sharing torch's multi-tenant store: "
                      "RPC internals")

    def test_take_over_listen_socket(self):
        listen_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listen_sock.bind((DEFAULT_HOSTNAME, 0))
        addr, port = listen_sock.getsockname()[:2]
        listen_fd = listen_sock.detach()
        try:
            s = self.keep(TCPStore(addr, port, 1, is_master=True, master_listen_fd=listen_fd))
        except BaseException:
            os.close(listen_fd)
            raise
        s.set("key", "value")
        self.assertEqual(b"value", s.get("key"))

    def test_numkeys_delkeys(self):
        fs = self._create_store()
        self.assertEqual(1, fs.num_keys())
        fs.add("key", 1)
        fs.add("key", 2)
        fs.add("key", 3)
        fs.set("key0", "value0")
        fs.add("key3", 1)
        fs.set("key1", "value1")
        self.assertEqual(5, fs.num_keys())
        fs.delete_key("key")
        self.assertEqual(4, fs.num_keys())
        fs.set_timeout(timedelta(seconds=2))
        with self.assertRaises(RuntimeError):
            fs.get("key")
        fs.delete_key("key0")
        fs.delete_key("key3")
        self.assertEqual(2, fs.num_keys())
        fs.set("key4", "value2")
        self.assertEqual(3, fs.num_keys())
        self.assertEqual(b"value1", fs.get("key1"))
        self.assertEqual(b"value2", fs.get("key4"))

    def _create_client(self, index, addr, port, world_size):
        client = self.keep(TCPStore(addr, port, world_size=world_size, timeout=timedelta(seconds=10)))
        self.assertEqual(b"value", client.get("key"))
        client.set("new_key%d" % index, "new_value%d" % index)
        self.assertEqual(("next_value%d" % index).encode(),
                         client.compare_set("new_key%d" % index, "new_value%d" % index,
                                            "next_value%d" % index))

    def _multi_worker_helper(self, world_size):
        server_store = self.keep(create_tcp_store(DEFAULT_HOSTNAME))
        server_store.set("key", "value")
        for i in range(world_size or 1):
            self._create_client(i, DEFAULT_HOSTNAME, server_store.port, world_size)

    def test_multi_worker_with_fixed_world_size(self):
        self._multi_worker_helper(5)

    def test_multi_worker_with_nonfixed_world_size(self):
        self._multi_worker_helper(None)

    def test_append(self):   # torch's TCPStore override: no has_extended_api() check
        s = self._create_store()
        s.set("foo", "po")
        s.append("foo", "tato")
        s.append("bar", "po")
        s.append("bar", "tato")
        self.assertEqual(b"potato", s.get("foo"))
        self.assertEqual(b"potato", s.get("bar"))

    def test_multi_set(self):
        s = self._create_store()
        s.multi_set(["foo", "bar"], ["po", "tato"])
        self.assertEqual(b"po", s.get("foo"))
        self.assertEqual(b"tato", s.get("bar"))

    def test_multi_get(self):
        s = self._create_store()
        s.set("foo", "po")
        s.set("bar", "tato")
        v0, v1 = s.multi_get(["foo", "bar"])
        self.assertEqual(b"po", v0)
        self.assertEqual(b"tato", v1)

    def test_store_timeout_on_missing_clients(self):
        with self.assertRaisesRegex(DistStoreError,
                                    r"Timed out after \d+ seconds waiting for clients. \d+/\d+ clients joined."):
            self.keep(TCPStore(DEFAULT_HOSTNAME, 0, 2, True, timeout=timedelta(seconds=2)))
        self.keep(TCPStore(DEFAULT_HOSTNAME, 0, 2, True, timeout=timedelta(seconds=2),
                           wait_for_workers=False))

    def test_world_size_0_raises(self):
        with self.assertRaisesRegex(ValueError, "TCPStore world size cannot be 0"):
            TCPStore(DEFAULT_HOSTNAME, 0, world_size=0, is_master=False)

    def test_agent_store(self):
        s = self._create_store()
        with self.assertRaisesRegex(DistNetworkError,
                                    "The server socket has failed to listen on any local network address"):
            self.keep(TCPStore(DEFAULT_HOSTNAME, s.port, world_size=1, is_master=True))
        saved = {k: os.environ.get(k) for k in ("TORCHELASTIC_USE_AGENT_STORE", "MASTER_PORT")}
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "1"
        os.environ["MASTER_PORT"] = str(s.port)
        try:
            second = self.keep(TCPStore(DEFAULT_HOSTNAME, s.port, world_size=1, is_master=True))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.assertEqual(s.port, second.port)


class LibUvTCPStoreTest(_NotApplicable, TCPStoreTest):
    why = "libuv is one of torch's two C++ TCPStore servers; ours is one Python server"


class PrefixTCPStoreTest(StoreTestBase, unittest.TestCase):
    def setUp(self):
        super().setUp()
        self.tcpstore = self.keep(create_tcp_store())
        self.prefix = "test_prefix"
        self.tcpstore.set_timeout(timedelta(seconds=300))

    def _create_store(self):
        return PrefixStore(self.prefix, self.tcpstore)

    @property
    def num_keys_total(self):
        return 6

    def test_underlying_non_prefix_store(self):
        s = self._create_store()
        wrapped = PrefixStore(self.prefix, PrefixStore(self.prefix, s))
        self.assertEqual(self.tcpstore, s._underlying_non_prefix_store)
        self.assertEqual(self.tcpstore, wrapped._underlying_non_prefix_store)


class MyPythonStore:
    """torch's minimal user-written store (a dist.Store subclass there; we have no base class)."""

    def __init__(self):
        self.store = {}

    def set(self, key, value):
        if not isinstance(key, (str, bytes)):
            raise AssertionError("set takes a string key")
        if type(value) is not bytes:
            raise AssertionError("set takes a bytes value")
        self.store[key] = value

    def get(self, key):
        value = self.store.get(key, b"")
        if type(value) is not bytes:
            raise AssertionError("get returns bytes")
        return value

    def add(self, key, value):
        new = int(self.store.get(key, 0)) + value
        self.set(key, str(new).encode())
        return new

    def compare_set(self, key, expected, new_value):
        if type(expected) is not bytes or type(new_value) is not bytes:
            raise AssertionError("compare_set takes bytes")
        val = self.store.get(key)
        if expected == val or val is None:
            val = self.store[key] = new_value
        return val

    def clone(self):
        return self


class DummyStore:
    def __init__(self):
        self.appends = []
        self.multi_sets = []
        self.multi_gets = []
        self.multi_get_res = []

    def append(self, key, value):
        self.appends.append((key, value))

    def multi_get(self, keys):
        self.multi_gets.append(keys)
        return self.multi_get_res.pop(0)

    def multi_set(self, keys, values):
        self.multi_sets.append((keys, values))

    def has_extended_api(self):
        return True


class TestPythonStore(unittest.TestCase):
    def test_optional_methods_fail(self):
        self.skipTest("tests the defaults of torch's dist.Store C++ base class; we have no base class")

    def test_has_extended_api_passthrough(self):
        self.skipTest("needs a subclass of torch's dist.Store C++ base class; we have no base class")

    def test_has_extended_api_roundtrip(self):
        self.assertTrue(PrefixStore("p", DummyStore()).has_extended_api())

    def test_append_roundtrip(self):
        s = DummyStore()
        PrefixStore("p", s).append("foo", "bar")
        self.assertEqual(1, len(s.appends))
        self.assertEqual(("p/foo", b"bar"), s.appends[0])

    def test_multi_get_roundtrip(self):
        s = DummyStore()
        s.multi_get_res.append([b"x", b"y"])
        res = PrefixStore("p", s).multi_get(["foo", "bar"])
        self.assertEqual(1, len(s.multi_gets))
        self.assertEqual(["p/foo", "p/bar"], s.multi_gets[0])
        self.assertEqual([b"x", b"y"], res)

    def test_multi_set_roundtrip(self):
        s = DummyStore()
        PrefixStore("p", s).multi_set(["foo", "bar"], [b"x", b"y"])
        self.assertEqual(1, len(s.multi_sets))
        self.assertEqual(["p/foo", "p/bar"], s.multi_sets[0][0])
        self.assertEqual([b"x", b"y"], s.multi_sets[0][1])

    def test_extended_methods_fallbacks(self):
        s = PrefixStore("p", MyPythonStore())
        self.assertFalse(s.has_extended_api())
        s.append("foo", b"po")
        s.append("foo", b"tato")
        self.assertEqual(b"potato", s.get("foo"))
        s.multi_set(["a", "b"], [b"c", b"d"])
        self.assertEqual([b"c", b"d", b"potato"], s.multi_get(["a", "b", "foo"]))


class TestMultiThreadedWait(_Stores, unittest.TestCase):
    """torch runs each case as ranks 0 and 1 in two threads (MultiThreadedTestCase)."""

    def _two_ranks(self, body):
        errors = []

        def run(rank):
            try:
                body(rank)
            except BaseException as e:   # surfaced in the main thread below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if errors:
            raise errors[0]
        self.assertFalse(any(t.is_alive() for t in threads), "a rank is still waiting")

    def _test_wait(self, s, rank):
        s.set_timeout(timedelta(seconds=2))
        if rank == 0:
            s.wait(["key1"])
            self.assertEqual(b"value1", s.get("key1"))
        if rank == 1:
            s.set("key1", "value1")

    def test_wait_hash_store(self):
        self.skipTest("HashStore: elasticrun has only the TCP store")

    def test_wait_file_store(self):
        self.skipTest("FileStore: elasticrun has only the TCP store")

    def test_wait_prefix_file_store(self):
        self.skipTest("FileStore: elasticrun has only the TCP store")

    def test_wait_tcp_store(self):
        master = self.keep(create_tcp_store())
        # torch shares the class's master store between its cases; one key is waited on twice
        client = self.keep(TCPStore(master.host, master.port, is_master=False))
        barrier = threading.Barrier(2)

        def body(rank):
            s = master if rank == 0 else client
            self._test_wait(s, rank)
            barrier.wait(30)
            self._test_wait(PrefixStore("pre", s), rank)

        self._two_ranks(body)

    def test_wait_tcp_store_uv(self):
        self.skipTest("libuv: one of torch's two C++ servers")


class TimeoutTest(_Stores, unittest.TestCase):
    def tearDown(self):
        super().tearDown()
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    def test_interrupt_doesnt_break_wait(self):
        # torch sleeps 1 s before the signal and 4 s before the set; events give the same order
        rank_res = [None, None]
        waiting, signalled = threading.Event(), threading.Event()

        def run(rank, my_store):
            try:
                if rank == 0:
                    signalled.wait(30)
                    my_store.set("foo", "bar")
                else:
                    waiting.set()
                    my_store.wait(["foo"], timedelta(seconds=10))
                rank_res[rank] = True
            except Exception as e:
                rank_res[rank] = e

        rank0 = self.keep(TCPStore(DEFAULT_HOSTNAME, 0, is_master=True))
        rank1 = self.keep(TCPStore(DEFAULT_HOSTNAME, rank0.port, is_master=False))
        threads = [threading.Thread(target=run, args=(i, [rank0, rank1][i])) for i in range(2)]
        for t in threads:
            t.start()
        signal.signal(signal.SIGUSR1, lambda *a: None)
        waiting.wait(30)
        signal.pthread_kill(threads[1].ident, signal.SIGUSR1)
        signalled.set()
        for t in threads:
            t.join(30)
        self.assertIs(True, rank_res[0], "rank0")
        self.assertIs(True, rank_res[1], "rank1")


class RendezvousTCPTest(_Stores, unittest.TestCase):
    """torch's `tcp://` init-method rendezvous makes a master TCPStore (world_size from the URL); the
    store cases are ported with that store made directly."""

    def _rendezvous(self, timeout=timedelta(seconds=10)):
        return self.keep(TCPStore(DEFAULT_HOSTNAME, find_free_port(), is_master=True, timeout=timeout))

    def test_common_errors(self):
        self.skipTest("parses torch's init_method URLs (tcp://host:port?rank=&world_size=): "
                      "torch.distributed.rendezvous, not a store")

    def test_dns_timeout(self):
        with self.assertRaisesRegex(DistNetworkError,
                                    "client socket has timed out after.*dnsnotexist") as manager:
            self.keep(TCPStore("dnsnotexist", 23456, timeout=timedelta(seconds=1)))
        self.assertIsInstance(manager.exception, DistError)
        self.assertIsInstance(manager.exception, RuntimeError)   # torch's DistError is one

    def test_nominal(self):
        store0 = self._rendezvous()
        store0.set("key0", "value0")
        self.assertEqual(b"value0", store0.get("key0"))

    def test_tcp_store_timeout_set(self):
        store0 = self._rendezvous()
        store0.set_timeout(timedelta(seconds=0.1))
        with self.assertRaisesRegex(DistStoreError, "wait timeout after 100ms, keys: /nonexistent key"):
            store0.get("nonexistent key")

    def test_tcp_store_timeout_doest_break_client(self):
        store0 = self._rendezvous()
        store0.set_timeout(timedelta(seconds=0.1))
        with self.assertRaisesRegex(DistStoreError, "wait timeout after 100ms, keys: /the_key"):
            store0.get("the_key")
        store0.set("the_key", "x")
        self.assertEqual(b"x", store0.get("the_key"))

    def test_tcp_store_url_with_libuv(self):
        self.skipTest("libuv: one of torch's two C++ servers")


class TestClientProtocol(unittest.TestCase):
    def test_client_connect(self):
        self.skipTest("speaks torch's C++ TCPStore wire protocol (VALIDATE 0x3C85F7CE, PING); our "
                      "store has its own protocol, documented in store.py")
