"""PyTorch's test/distributed/launcher/test_run.py (torchrun's own tests), run against our launcher.

"Change one word": ``torchrun ARGS`` becomes ``python elastic.py ARGS`` (see suite_launcher.py for how
torch's in-process ``main`` maps to exit codes). The worker scripts are our own versions of torch's
bin/ scripts. Cases whose workers need torch run the launcher with the torch venv's interpreter (as a
torchrun user's Python has torch); the launcher never imports it. Cases that patch torch's launcher
internals call ``elastic.main`` in-process with the same patch applied to our module.
"""
import os
import shutil
import subprocess
import tempfile
import unittest
import uuid
from unittest import mock
from unittest.mock import Mock

import pytest

import elastic
import rendezvous
from conftest import need
from ports import free_port
from suite_launcher import clean_env, launch, Launcher, path


def get_free_port():
    return free_port("127.0.0.1")


class MockException(Exception):
    pass


class ElasticLaunchTest(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _torch(self, request):
        self._request = request

    def torch_python(self):
        return self._request.getfixturevalue("torch_python")

    def setUp(self):
        super().setUp()
        self.test_dir = tempfile.mkdtemp()
        self.env = clean_env()   # no PET_* leftovers; TEST_SENTINEL_PARENT=FOOBAR for the workers

    def tearDown(self):
        shutil.rmtree(self.test_dir)

    def assert_all_ran(self, world_size, run=None):
        self.assertSetEqual({str(i) for i in range(world_size)}, set(os.listdir(self.test_dir)),
                            run)

    def assert_refused(self, run):
        """torch's `assertRaises(ValueError)` around main(): refused before any worker ran."""
        self.assertNotEqual(0, run.returncode, run)
        self.assertEqual([], os.listdir(self.test_dir), run)

    def test_launch_user_script_python(self):
        run = launch(["--nnodes=1", "--nproc-per-node=4", "--rdzv-id=%d" % uuid.uuid4().int,
                      "--monitor-interval=1", "--start-method=spawn", path("bin/test_script.py"),
                      "--touch-file-dir=%s" % self.test_dir], env=self.env)
        self.assertEqual(0, run.returncode, run)
        self.assert_all_ran(4, run)

    def test_launch_user_script_python_caffe2_bc(self):
        run = launch(["--nnodes=1", "--nproc-per-node=4", "--monitor-interval=1", "--start-method=spawn",
                      "--master-addr=localhost", "--master-port=%d" % get_free_port(), "--node-rank=0",
                      path("bin/test_script.py"), "--touch-file-dir=%s" % self.test_dir], env=self.env)
        self.assertEqual(0, run.returncode, run)
        self.assert_all_ran(4, run)

    def _bash_args(self, nproc=None):
        args = ["--nnodes=1"] + (["--nproc-per-node=%d" % nproc] if nproc else [])
        return args + ["--rdzv-id=%d" % uuid.uuid4().int, "--monitor-interval=1", "--start-method=spawn",
                       "--no-python"]

    def test_launch_user_script_bash(self):
        script_args = [path("bin/test_script.sh"), self.test_dir]
        self.assert_refused(launch(self._bash_args(4) + ["--module"] + script_args, env=self.env))
        run = launch(self._bash_args(4) + script_args, env=self.env)
        self.assertEqual(0, run.returncode, run)
        self.assert_all_ran(4, run)

    def test_launch_user_script_default_nproc(self):
        script_args = [path("bin/test_script.sh"), self.test_dir]
        self.assert_refused(launch(self._bash_args() + ["--module"] + script_args, env=self.env))
        run = launch(self._bash_args() + script_args, env=self.env)
        self.assertEqual(0, run.returncode, run)
        self.assert_all_ran(1, run)

    def test_launch_with_env_vars(self):
        env = dict(self.env, PET_NNODES="1", PET_NPROC_PER_NODE="4", PET_RDZV_ID=str(uuid.uuid4().int),
                   PET_MONITOR_INTERVAL="1", PET_START_METHOD="spawn", PET_NO_PYTHON="1")
        script_args = [path("bin/test_script.sh"), self.test_dir]
        self.assert_refused(launch(script_args, env=dict(env, PET_MODULE="1")))
        run = launch(script_args, env=dict(env, PET_MODULE="0"))
        self.assertEqual(0, run.returncode, run)
        self.assert_all_ran(4, run)

    def _test_nproc_launch_configuration(self, nproc_type, expected_number):
        run = launch(["--nnodes=1", "--nproc-per-node=%s" % nproc_type, "--rdzv-id=%d" % uuid.uuid4().int,
                      "--monitor-interval=1", "--start-method=spawn", "--no-python",
                      path("bin/test_script.sh"), self.test_dir], env=self.env)
        if run.returncode != 0:
            raise ValueError("launcher refused --nproc-per-node=%s: %r" % (nproc_type, run))
        self.assert_all_ran(expected_number, run)

    def test_nproc_launch_auto_configurations(self):
        # torch patches the accelerator away; this machine has none. torch counts the CPUs this
        # process may run on (torch._utils.cpu_count: the affinity mask)
        self._test_nproc_launch_configuration("auto", len(os.sched_getaffinity(0)))

    def test_nproc_launch_number_configurations(self):
        self._test_nproc_launch_configuration("4", 4)

    def test_nproc_launch_unknown_configurations(self):
        with self.assertRaises(ValueError):
            self._test_nproc_launch_configuration("unknown", 4)

    def test_nproc_gpu_launch_configurations(self):
        self.skipTest("CUDA: torch patches torch.cuda to report 3 GPUs; ours counts `nvidia-smi -L`")

    def test_nproc_xpu_launch_configurations(self):
        self.skipTest("XPU accelerators: torch patches torch.xpu; we count no XPUs")

    def _elastic_args(self, conf):
        return ["--nnodes=1:2", "--nproc-per-node=4", "--rdzv-backend=c10d",
                "--rdzv-endpoint=localhost:%d" % get_free_port(), conf,
                "--rdzv-id=%d" % uuid.uuid4().int, "--monitor-interval=1"]

    def test_launch_elastic(self):
        run = launch(self._elastic_args("--rdzv-conf='join_timeout=5,last_call_timeout=1,timeout=5'")
                     + ["--start-method=spawn", path("bin/test_script.py"),
                        "--touch-file-dir=%s" % self.test_dir], env=self.env)
        self.assertEqual(0, run.returncode, run)
        self.assert_all_ran(4, run)

    def test_launch_elastic_worker_raise_exception(self):
        # torch also asserts its internal events.record was called once; ours writes --event-log
        run = launch(self._elastic_args("--rdzv-conf='join_timeout=5,last_call_timeout=1,timeout=5'")
                     + ["--max-restarts=0", "--start-method=spawn", path("bin/test_script.py"), "--fail"],
                     env=self.env)
        # ChildFailedError: the root-cause worker's exit code and its error in the report
        self.assertEqual(1, run.returncode, run)
        self.assertIn("raising exception since --fail flag was set", run.stderr, run)

    def test_launch_elastic_agent_raise_exception(self):
        args = self._elastic_args("--rdzv_conf=timeout=5") + [
            "--max-restarts=0", "--start-method=spawn", path("bin/test_script.py"),
            "--touch-file-dir=%s" % self.test_dir]
        with mock.patch.object(elastic.LocalElasticAgent, "run", side_effect=MockException):
            with self.assertRaises(MockException):
                elastic.main(args)

    def test_launch_standalone(self):
        run = launch(["--nnodes=1", "--nproc-per-node=4", "--standalone", "--monitor-interval=1",
                      "--start-method=spawn", path("bin/test_script.py"),
                      "--touch-file-dir=%s" % self.test_dir], env=self.env)
        self.assertEqual(0, run.returncode, run)
        self.assert_all_ran(4, run)

    def test_launch_run_path(self):
        run = launch(["--run-path", "--nnodes=1", "--nproc-per-node=4", "--monitor-interval=1",
                      "--start-method=spawn", path("bin/test_script.py"),
                      "--touch-file-dir=%s" % self.test_dir], env=self.env)
        self.assertEqual(0, run.returncode, run)
        self.assert_all_ran(4, run)

    def test_launch_elastic_multiple_agents(self):
        args = self._elastic_args("--rdzv_conf=timeout=5") + [
            "--start-method=spawn", path("bin/test_script.py"), "--touch-file-dir=%s" % self.test_dir]
        other = Launcher(args, env=self.env)
        try:
            run = launch(args, env=self.env)
            other_run = other.wait()
        finally:
            other.kill()
        self.assertEqual(0, other_run.returncode, other_run)
        self.assertEqual(0, run.returncode, run)
        self.assert_all_ran(8, run)

    def test_min_max_nodes_parse(self):
        self.assertEqual((1, 1), elastic.parse_min_max_nnodes("1"))
        self.assertEqual((2, 20), elastic.parse_min_max_nnodes("2:20"))
        with self.assertRaises(RuntimeError):
            elastic.parse_min_max_nnodes("2:20:30")

    def test_launch_shutdown(self):
        args = ["--nnodes=1", "--nproc-per-node=4", "--monitor-interval=1", "--start-method=spawn",
                path("bin/test_script.py"), "--touch-file-dir=%s" % self.test_dir]
        agent_mock = Mock()
        agent_mock.run.return_value = elastic.RunResult(elastic.WorkerState.SUCCEEDED)
        rdzv_handler_mock = Mock()
        with mock.patch.object(elastic, "LocalElasticAgent", return_value=agent_mock), \
                mock.patch.object(rendezvous, "get_rendezvous_handler", return_value=rdzv_handler_mock):
            elastic.main(args)
            rdzv_handler_mock.shutdown.assert_called_once()

    def test_is_torchelastic_launched(self):
        out_file = os.path.join(self.test_dir, "out")
        run = launch(["--run-path", "--nnodes=1", "--nproc-per-node=1", "--monitor-interval=1",
                      path("bin/test_script_is_torchelastic_launched.py"), "--out-file=%s" % out_file],
                     python=self.torch_python(), env=self.env)
        self.assertEqual(0, run.returncode, run)
        with open(out_file) as fp:
            self.assertEqual("True", fp.readline())

    def test_is_torchelastic_launched_with_logs_spec_defined(self):
        # torch patches its entry-point lookup so that `default` loads DefaultLogsSpecs
        out_file = os.path.join(self.test_dir, "out")
        run = launch(["--run-path", "--nnodes=1", "--nproc-per-node=1", "--monitor-interval=1",
                      "--logs_specs=default", path("bin/test_script_is_torchelastic_launched.py"),
                      "--out-file=%s" % out_file], python=self.torch_python(), env=self.env)
        self.assertEqual(0, run.returncode, run)
        with open(out_file) as fp:
            self.assertEqual("True", fp.readline())

    def test_logs_logs_spec_entrypoint_must_be_defined(self):
        run = launch(["--run-path", "--nnodes=1", "--nproc-per-node=1", "--monitor-interval=1",
                      "--logs_specs=DOESNOT_EXIST", path("bin/test_script_is_torchelastic_launched.py")],
                     env=self.env)
        self.assertNotEqual(0, run.returncode, run)
        self.assertIn("DOESNOT_EXIST", run.stderr, run)

    def test_is_not_torchelastic_launched(self):
        out_file = os.path.join(self.test_dir, "out")
        subprocess.run([self.torch_python(), path("bin/test_script_is_torchelastic_launched.py"),
                        "--out-file=%s" % out_file], env=self.env, check=True, timeout=120)
        with open(out_file) as fp:
            self.assertEqual("False", fp.readline())

    def test_init_method_tcp_with_torchelastic(self):
        port = get_free_port()
        run = launch(["--run-path", "--nnodes=1", "--nproc-per-node=4", "--master-addr=localhost",
                      "--master-port=%d" % port, "--monitor-interval=1",
                      path("bin/test_script_init_method.py"), "--init-method=tcp://localhost:%d" % port],
                     python=self.torch_python(), env=self.env)
        self.assertEqual(0, run.returncode, run)

    def test_init_method_env_with_torchelastic(self):
        run = launch(["--run-path", "--nnodes=1", "--nproc-per-node=4", "--master-addr=localhost",
                      "--master-port=%d" % get_free_port(), "--monitor-interval=1",
                      path("bin/test_script_init_method.py"), "--init-method=env://"],
                     python=self.torch_python(), env=self.env)
        self.assertEqual(0, run.returncode, run)

    def test_capture_logs_using_default_logs_specs(self):
        run = launch(["--nnodes=1", "--nproc-per-node=4", "--rdzv-id=%d" % uuid.uuid4().int,
                      "--redirect=3", "--tee=3", "--monitor-interval=1", "--start-method=spawn",
                      "--no-python", path("bin/test_script.sh"), self.test_dir],
                     env=dict(self.env, TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE="[rank${rank}]: "))
        for i in range(4):
            self.assertIn("[rank%d]: creating " % i, run.stdout, run)

    def test_virtual_local_rank(self):
        self.skipTest("needs 2 GPUs (compares compiled CUDA code across ranks)")
