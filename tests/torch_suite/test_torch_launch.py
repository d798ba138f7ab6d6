"""PyTorch's test/distributed/launcher/launch_test.py (the legacy ``torch.distributed.launch``),
run against our launcher: ``python -m torch.distributed.launch ARGS`` becomes ``python elastic.py ARGS``.
Both cases are a documented difference: elasticrun is torchrun, not torch.distributed.launch.
"""
import os
import shutil
import tempfile
import unittest

from ports import free_port
from suite_launcher import clean_env, launch, path


class LaunchTest(unittest.TestCase):
    def setUp(self):
        self.test_dir = tempfile.mkdtemp()
        self.env = clean_env()   # TEST_SENTINEL_PARENT=FOOBAR for the workers

    def tearDown(self):
        shutil.rmtree(self.test_dir)

    # A documented difference (README, "Differences from torchrun"): elasticrun is torchrun, not the
    # deprecated torch.distributed.launch. torchrun passes no --local-rank and has no --use-env; a
    # script that wants the argument gets it by writing --local-rank=${local_rank} after its name.
    def _args(self):
        return ["--nnodes=1", "--nproc-per-node=4", "--monitor-interval=1", "--start-method=spawn",
                "--master-addr=localhost", "--master-port=%d" % free_port(), "--node-rank=0"]

    def test_launch_without_env(self):
        script = path("bin/test_script_local_rank.py")
        run = launch(self._args() + [script], env=self.env)
        # as under torchrun: the script's own argument parser refuses to run without --local-rank
        self.assertNotEqual(0, run.returncode, run)
        self.assertIn("--local-rank", run.stderr, run)
        run = launch(self._args() + [script, "--local-rank=${local_rank}"], env=self.env)
        self.assertEqual(0, run.returncode, run)

    def test_launch_with_env(self):
        script_args = [path("bin/test_script.py"), "--touch-file-dir=%s" % self.test_dir]
        run = launch(self._args() + ["--use-env"] + script_args, env=self.env)
        self.assertEqual(2, run.returncode, run)
        self.assertIn("unrecognized option --use-env", run.stderr, run)
        self.assertEqual([], os.listdir(self.test_dir), run)
        run = launch(self._args() + script_args, env=self.env)   # the environment is always used
        self.assertEqual(0, run.returncode, run)
        self.assertSetEqual({str(i) for i in range(4)}, set(os.listdir(self.test_dir)), run)
