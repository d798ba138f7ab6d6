"""PyTorch's test/distributed/elastic/timer/file_based_local_timer_test.py, run against elastic.py.

"Change one word": ``torch.distributed.elastic.timer`` becomes our ``elastic`` module (it holds
FileTimerServer, FileTimerClient, FileTimerRequest, configure and expires). torch's cases that reach
into its server's and client's internals (``run_once``, ``_reap_worker``, ``is_process_running``,
``_run_watchdog``, ``_send_request``) are skips naming the test of ours that covers the same
behaviour. Timed-out children are real processes killed by the real server, as in torch.
"""
import multiprocessing
import os
import signal
import time
import unittest
import unittest.mock as mock
import uuid

import pytest

import elastic as timer

mp = multiprocessing.get_context("fork")   # torch's default on Linux; the cases pass local functions


def internal(name, ours):
    pytest.skip("torch internal: %s; covered by tests/test_timer.py::%s" % (name, ours))


def func2(n, file_path):
    """Times out: each level allows 0.1 s and sleeps 0.2 s after the inner call."""
    if file_path is not None:
        timer.configure(timer.FileTimerClient(file_path))
    if n > 0:
        with timer.expires(after=0.1):
            func2(n - 1, None)
            time.sleep(0.2)


def _in_child(target, *args):
    p = mp.Process(target=target, args=args)
    p.start()
    try:
        p.join(60)
    finally:
        if p.is_alive():
            p.kill()
            p.join()
    return p.exitcode


class FileTimerTest(unittest.TestCase):
    def setUp(self):
        super().setUp()
        self.max_interval = 0.01
        self.file_path = "/tmp/test_file_path_%d_%s" % (os.getpid(), uuid.uuid4())
        self.server = timer.FileTimerServer(self.file_path, "test", self.max_interval)
        self.server.start()

    def tearDown(self):
        super().tearDown()
        self.server.stop()
        timer.configure(None)

    def test_exception_propagation(self):
        with self.assertRaises(RuntimeError, msg="foobar"):
            with timer.expires(after=1):
                raise RuntimeError("foobar")

    def test_no_client(self):
        timer.configure(None)
        with mock.patch.dict(os.environ):
            os.environ.pop("TORCHELASTIC_TIMER_FILE", None)   # torch's test runs outside any agent
            with self.assertRaises(RuntimeError):
                with timer.expires(after=1):
                    pass

    def test_client_interaction(self):
        client = timer.FileTimerClient(self.file_path)
        client.acquire = mock.MagicMock(wraps=client.acquire)
        client.release = mock.MagicMock(wraps=client.release)
        with timer.expires(after=1, scope="test", client=client):
            pass
        client.acquire.assert_called_once_with("test", mock.ANY)
        client.release.assert_called_once_with("test")

    def test_happy_path(self):
        timer.configure(timer.FileTimerClient(self.file_path))
        with timer.expires(after=0.5):
            time.sleep(0.1)

    def test_get_timer_recursive(self):
        """A deliberate difference (README, "Differences from torchrun"). torch's default scope
        names a line of contextlib, the same for every block, so each inner call takes over the
        one timer and its release removes it: the outer calls run on unguarded, and torch's func(4)
        (outermost call 0.2 s against its 0.1 s) returns. Ours gives every ``expires()`` its own
        timer, so the outermost call's 0.1 s holds and func(4) is SIGKILLed. Ours is the safer one:
        under torch any guarded step inside a guarded phase leaves the rest of that phase without
        a timer, free to hang for ever."""
        def func(n):
            if n > 0:
                with timer.expires(after=0.1):
                    func(n - 1)
                    time.sleep(0.05)

        def run_func(file_path):
            timer.configure(timer.FileTimerClient(file_path))
            func(4)

        # torch calls func(4) in the test process and expects it to return; under ours a child
        # runs it and the outermost call's overrun gets it SIGKILLed
        self.assertEqual(-signal.SIGKILL, _in_child(run_func, self.file_path))
        self.assertEqual(-signal.SIGKILL, _in_child(func2, 2, self.file_path))

    def test_multiple_clients_interaction(self):
        internal("FileTimerServer.run_once", "test_every_request_of_many_clients_is_read")

    @staticmethod
    def _acquire_and_exit(file_path):
        client = timer.FileTimerClient(file_path)
        timer.configure(client)
        client.acquire("test_scope", time.time() + 2)
        time.sleep(1)

    def test_exit_before_release(self):
        internal("FileTimerServer._reap_worker, run_once", "test_timers_of_dead_process_dropped")

    def test_exit_before_release_reap(self):
        internal("FileTimerServer._reap_worker, is_process_running, run_once",
                 "test_hung_worker_killed_sibling_left_alone")

    @staticmethod
    def _run(file_path, timeout, duration):
        timer.configure(timer.FileTimerClient(file_path))
        with timer.expires(after=timeout):
            time.sleep(duration)

    def test_timer(self):
        self.assertEqual(-signal.SIGKILL, _in_child(self._run, self.file_path, 0.1, 1))


class FileTimerClientTest(unittest.TestCase):
    def test_send_request_without_server(self):
        client = timer.FileTimerClient("test_file")
        timer.configure(client)
        try:
            with self.assertRaises(BrokenPipeError):
                with timer.expires(after=0.1):
                    time.sleep(0.1)
        finally:
            timer.configure(None)


class FileTimerServerTest(unittest.TestCase):
    def setUp(self):
        super().setUp()
        self.file_path = "/tmp/test_file_path_%d_%s" % (os.getpid(), uuid.uuid4())
        self.max_interval = 0.01
        self.server = timer.FileTimerServer(self.file_path, "test", self.max_interval)

    def tearDown(self):
        super().tearDown()
        self.server.stop()

    def test_watchdog_call_count(self):
        # ours has no per-interval pass: its thread sleeps in poll until a request, the nearest
        # expiry or a timer holder's exit
        internal("FileTimerServer._run_watchdog", "test_hung_worker_killed_sibling_left_alone")

    def test_watchdog_empty_queue(self):
        self.server.start()

    def test_expired_timers(self):
        internal("FileTimerClient._send_request, FileTimerServer.run_once",
                 "test_handwritten_torch_line_honoured_and_self_never_killed")

    def test_send_request_release(self):
        internal("FileTimerClient._send_request", "test_file_timer_request_is_the_line_the_server_reads")

    def test_valid_timers(self):
        internal("FileTimerClient._send_request, FileTimerServer.is_process_running, run_once",
                 "test_nested_scopes_keep_their_own_timers")
