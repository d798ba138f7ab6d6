"""PyTorch's test/distributed/elastic/timer/file_based_local_timer_test.py, run against elastic.py.

"Change one word": ``torch.distributed.elastic.timer`` becomes our ``elastic`` module (it holds
FileTimerServer, FileTimerClient, configure and expires). torch's cases that reach into its server's
internals (``run_once``, ``_reap_worker``, ``is_process_running``, ``_run_watchdog``,
``FileTimerRequest``, ``_send_request``) are ported as written; they fail on what we lack, marked xfail.
Timed-out children are real processes killed by the real server, as in torch.
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


def xfail(reason):
    return pytest.mark.xfail(strict=True, reason="issue 16: " + reason)


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

    @xfail("expires() without a scope gives every call its own timer (scope file:line#N), so the "
           "outer 0.1 s timer of a recursive function is not replaced by the inner ones: the "
           "non-timing-out func(4) was SIGKILLed (exit -9, expected 0)")
    def test_get_timer_recursive(self):
        """A function that takes a default-scope timer and recurses re-acquires that one timer: only
        the innermost call's timer counts."""
        def func(n):
            if n > 0:
                with timer.expires(after=0.1):
                    func(n - 1)
                    time.sleep(0.05)

        def run_func(file_path):
            timer.configure(timer.FileTimerClient(file_path))
            func(4)

        # torch calls func(4) in the test process; here a child takes the SIGKILL if it comes
        self.assertEqual(0, _in_child(run_func, self.file_path))
        self.assertEqual(-signal.SIGKILL, _in_child(func2, 2, self.file_path))

    @xfail("FileTimerServer has no run_once() (torch: handle every pending request now): "
           "AttributeError")
    def test_multiple_clients_interaction(self):
        def func(n, file_path):
            if file_path is not None:
                timer.configure(timer.FileTimerClient(file_path))
            if n > 0:
                with timer.expires(after=100):
                    func(n - 1, None)
                    time.sleep(0.01)

        num_clients, num_requests_per_client = 10, 10
        procs = [mp.Process(target=func, args=(num_requests_per_client, self.file_path))
                 for _ in range(num_clients)]
        try:
            for p in procs:
                p.start()
            for p in procs:
                p.join(60)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        self.server.run_once()
        self.assertEqual(2 * num_clients * num_requests_per_client, self.server._request_count)

    @staticmethod
    def _acquire_and_exit(file_path):
        client = timer.FileTimerClient(file_path)
        timer.configure(client)
        client.acquire("test_scope", time.time() + 2)
        time.sleep(1)

    @xfail("FileTimerServer has no _reap_worker to patch: AttributeError")
    def test_exit_before_release(self):
        with mock.patch.object(timer.FileTimerServer, "_reap_worker") as mock_reap:
            _in_child(self._acquire_and_exit, self.file_path)
            time.sleep(2)
            self.server.run_once()
            mock_reap.assert_not_called()
            self.assertEqual(0, len(self.server._timers))

    @xfail("FileTimerServer has no _reap_worker / is_process_running to patch: AttributeError")
    def test_exit_before_release_reap(self):
        with mock.patch.object(timer.FileTimerServer, "_reap_worker") as mock_reap, \
                mock.patch.object(timer.FileTimerServer, "is_process_running") as mock_pid_exists:
            mock_pid_exists.return_value = True
            _in_child(self._acquire_and_exit, self.file_path)
            time.sleep(2)
            self.server.run_once()
            mock_reap.assert_called()
            self.assertEqual(0, len(self.server._timers))

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


_NO_REQUEST = xfail("elastic has no FileTimerRequest and FileTimerClient has no _send_request "
                    "(torch's request object and raw send): AttributeError")


class FileTimerServerTest(unittest.TestCase):
    def setUp(self):
        super().setUp()
        self.file_path = "/tmp/test_file_path_%d_%s" % (os.getpid(), uuid.uuid4())
        self.max_interval = 0.01
        self.server = timer.FileTimerServer(self.file_path, "test", self.max_interval)

    def tearDown(self):
        super().tearDown()
        self.server.stop()

    @xfail("FileTimerServer has no _run_watchdog (torch's per-interval watchdog pass; ours sleeps in "
           "poll until something happens): AttributeError")
    def test_watchdog_call_count(self):
        self.server._run_watchdog = mock.MagicMock(wraps=self.server._run_watchdog)
        self.server.start()
        client = timer.FileTimerClient(self.file_path)
        client._send_request(self._valid_timer(pid=-3, scope="test0"))
        wait = 0.1
        time.sleep(wait)
        self.server.stop()
        count = self.server._run_watchdog.call_count
        self.assertGreaterEqual(count, int(wait / self.max_interval) - 1)
        self.assertLessEqual(count, int(wait / self.max_interval) + 1)

    def test_watchdog_empty_queue(self):
        self.server.start()

    def _expired_timer(self, pid, scope):
        return timer.FileTimerRequest(worker_pid=pid, scope_id=scope, expiration_time=time.time() - 60,
                                      signal=signal.SIGKILL)

    def _valid_timer(self, pid, scope):
        return timer.FileTimerRequest(worker_pid=pid, scope_id=scope, expiration_time=time.time() + 60,
                                      signal=signal.SIGKILL)

    def _release_timer(self, pid, scope):
        return timer.FileTimerRequest(worker_pid=pid, scope_id=scope, expiration_time=-1)

    @_NO_REQUEST
    def test_expired_timers(self):
        with mock.patch("os.kill") as mock_os_kill:
            self.server.start()
            client = timer.FileTimerClient(self.file_path)
            client._send_request(self._expired_timer(pid=-3, scope="test1"))
            client._send_request(self._valid_timer(pid=-3, scope="test2"))
            self.server.run_once()
            self.assertEqual(0, len(self.server._timers))
            mock_os_kill.assert_called_once_with(-3, signal.SIGKILL)

    @_NO_REQUEST
    def test_send_request_release(self):
        with mock.patch("os.kill") as mock_os_kill:
            self.server.start()
            client = timer.FileTimerClient(self.file_path)
            client._send_request(self._valid_timer(pid=-3, scope="test1"))
            client._send_request(self._release_timer(pid=-3, scope="test1"))
            client._send_request(self._release_timer(pid=-3, scope="test2"))
            self.assertEqual(0, len(self.server._timers))
            mock_os_kill.assert_not_called()

    @_NO_REQUEST
    def test_valid_timers(self):
        with mock.patch("os.kill") as mock_os_kill, \
                mock.patch.object(timer.FileTimerServer, "is_process_running", return_value=True):
            self.server.start()
            client = timer.FileTimerClient(self.file_path)
            for pid in (-3, -2):
                for scope in ("test1", "test2"):
                    client._send_request(self._valid_timer(pid=pid, scope=scope))
            self.server.run_once()
            self.assertEqual(4, len(self.server._timers))
            for key in [(-3, "test1"), (-3, "test2"), (-2, "test1"), (-2, "test2")]:
                self.assertIn(key, self.server._timers)
            mock_os_kill.assert_not_called()
