"""PyTorch's test/distributed/elastic/agent/server/test/local_elastic_agent_test.py, all of it, run
against our LocalElasticAgent and rendezvous backends.

Each torch test name runs its torch body (agent_cases.py) with torch's backend: ``c10d`` on a free
local port, ``etcd`` on one etcd server shared by the module (torch's setUpClass), ``etcd-v2`` skipped
(our etcd backend speaks the v3 API). A body runs in a child interpreter in its own session, killed
whatever happens: the torch venv's when the workers need torch, else this one.
"""
import os
import signal
import subprocess
import sys
import unittest

import pytest

from conftest import need
from etcd_cluster import EtcdCluster
from ports import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = os.path.join(HERE, "agent_cases.py")
HANG_GUARD = 240   # seconds: only catches a hang, never times anything



# A torch internal the case patches: no counterpart to patch here
_NO_BARRIER = ("torch internal: torch.distributed.elastic.utils.store.barrier (the case patches it to "
               "raise and expects one call and a successful job); ours is _Peers.exit_barrier, which logs "
               "a store error there and keeps the node's success, and a one-node run has no exit barrier")


@pytest.fixture(scope="module")
def etcd_endpoint(tmp_path_factory):
    import shutil
    binary = shutil.which("etcd")
    need(binary, "etcd not installed (apt-get install etcd-server)")
    cluster = EtcdCluster(binary, tmp_path_factory.mktemp("etcd"), size=1)
    cluster.start()
    try:
        yield cluster.endpoints[0]
    finally:
        cluster.stop()


def _env():
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PET_", "TORCHELASTIC_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                 "TORCH_NCCL_ASYNC_ERROR_HANDLING"))}


class LocalElasticAgentTest(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _fixtures(self, request, tmp_path):
        self._request = request
        self._tmp = tmp_path

    def run_test_with_backend(self, backend, test_to_run, torch=False):
        """torch's helper: pick the endpoint for `backend`, then run the body `test_to_run`."""
        if backend == "etcd-v2":
            self.skipTest("etcd v2 API: our etcd backend speaks v3 (through etcd's HTTP/JSON gateway)")
        if backend == "etcd":
            endpoint = self._request.getfixturevalue("etcd_endpoint")
        else:
            endpoint = "127.0.0.1:%d" % free_port()   # torch: localhost and a free port
        python = self._request.getfixturevalue("torch_python") if torch else sys.executable
        out_path = self._tmp / "case.out"
        with open(out_path, "wb") as out:
            proc = subprocess.Popen([python, CASES, test_to_run, backend, endpoint], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(),
                                    cwd=str(self._tmp), start_new_session=True)
        try:
            code = proc.wait(HANG_GUARD)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        output = out_path.read_text(errors="replace")
        if code != 0:
            self.fail("%s (%s) exited %s:\n%s" % (test_to_run, backend, code, output[-6000:]))

    # -- dummy_compute: tensors returned by function workers
    def test_dummy_compute_c10d(self):
        self.run_test_with_backend("c10d", "dummy_compute", torch=True)

    def test_dummy_compute_etcd(self):
        self.run_test_with_backend("etcd", "dummy_compute", torch=True)

    def test_dummy_compute_etcd_v2(self):
        self.run_test_with_backend("etcd-v2", "dummy_compute", torch=True)

    def test_run_happy_function_c10d(self):
        self.run_test_with_backend("c10d", "run_happy_function")

    def test_run_happy_function_etcd(self):
        self.run_test_with_backend("etcd", "run_happy_function")

    def test_run_happy_function_etcd_v2(self):
        self.run_test_with_backend("etcd-v2", "run_happy_function")

    def test_check_master_addr_port_override_etcd(self):
        self.run_test_with_backend("etcd", "check_master_addr_port_override")

    def test_check_master_addr_port_override_etcd_v2(self):
        self.run_test_with_backend("etcd-v2", "check_master_addr_port_override")

    def test_run_agent_local_watchdog_setup_enabled_etcd(self):
        self.run_test_with_backend("etcd", "run_agent_local_watchdog_setup_enabled")

    def test_run_agent_local_watchdog_setup_enabled_c10d(self):
        self.run_test_with_backend("c10d", "run_agent_local_watchdog_setup_enabled")

    def test_run_agent_local_watchdog_setup_disabled_etcd(self):
        self.run_test_with_backend("etcd", "run_agent_local_watchdog_setup_disabled")

    def test_run_agent_local_watchdog_setup_disabled_c10d(self):
        self.run_test_with_backend("c10d", "run_agent_local_watchdog_setup_disabled")

    def test_run_agent_healthcheck_setup_enabled_etcd(self):
        self.run_test_with_backend("etcd", "run_agent_healthcheck_setup_enabled")

    def test_run_agent_healthcheck_setup_enabled_c10d(self):
        self.run_test_with_backend("c10d", "run_agent_healthcheck_setup_enabled")

    def test_run_agent_healthcheck_setup_disabled_etcd(self):
        self.run_test_with_backend("etcd", "run_agent_healthcheck_setup_disabled")

    def test_run_agent_healthcheck_setup_disabled_c10d(self):
        self.run_test_with_backend("c10d", "run_agent_healthcheck_setup_disabled")

    def test_run_check_env_function_etcd(self):
        self.run_test_with_backend("etcd", "run_check_env_function")

    def test_run_check_nccl_async_error_handling_env_c10d(self):
        self.run_test_with_backend("c10d", "run_check_nccl_async_error_handling_env")

    def test_run_check_nccl_async_error_handling_env_default_c10d(self):
        self.run_test_with_backend("c10d", "run_check_nccl_async_error_handling_env_default")

    def test_run_function_with_return_value_c10d(self):
        self.run_test_with_backend("c10d", "run_function_with_return_value")

    def test_run_function_with_return_value_etcd(self):
        self.run_test_with_backend("etcd", "run_function_with_return_value")

    def test_run_function_with_return_value_etcd_v2(self):
        self.run_test_with_backend("etcd-v2", "run_function_with_return_value")

    def test_simple_dist_sum_c10d(self):
        self.run_test_with_backend("c10d", "simple_dist_sum", torch=True)

    def test_simple_dist_sum_etcd(self):
        self.run_test_with_backend("etcd", "simple_dist_sum", torch=True)

    def test_simple_dist_sum_etcd_v2(self):
        self.run_test_with_backend("etcd-v2", "simple_dist_sum", torch=True)

    def test_run_distributed_sum_homogeneous_c10d(self):
        self.run_test_with_backend("c10d", "run_distributed_sum_homogeneous", torch=True)

    def test_run_with_custom_log_lines(self):
        self.run_test_with_backend("c10d", "run_with_custom_log_lines", torch=True)

    def test_run_distributed_sum_homogeneous_etcd(self):
        self.run_test_with_backend("etcd", "run_distributed_sum_homogeneous", torch=True)

    def test_run_distributed_sum_homogeneous_etcd_v2(self):
        self.run_test_with_backend("etcd-v2", "run_distributed_sum_homogeneous", torch=True)

    def test_run_distributed_sum_heterogeneous_c10d(self):
        self.run_test_with_backend("c10d", "run_distributed_sum_heterogeneous", torch=True)

    def test_run_distributed_sum_heterogeneous_etcd(self):
        self.run_test_with_backend("etcd", "run_distributed_sum_heterogeneous", torch=True)

    def test_run_distributed_sum_heterogeneous_etcd_v2(self):
        self.run_test_with_backend("etcd-v2", "run_distributed_sum_heterogeneous", torch=True)

    def test_run_sad_function_c10d(self):
        self.run_test_with_backend("c10d", "run_sad_function")

    def test_run_sad_function_etcd(self):
        self.run_test_with_backend("etcd", "run_sad_function")

    def test_run_sad_function_etcd_v2(self):
        self.run_test_with_backend("etcd-v2", "run_sad_function")

    def test_run_bipolar_function_c10d(self):
        self.run_test_with_backend("c10d", "run_bipolar_function")

    def test_run_bipolar_function_etcd(self):
        self.run_test_with_backend("etcd", "run_bipolar_function")

    def test_run_bipolar_function_etcd_v2(self):
        self.run_test_with_backend("etcd-v2", "run_bipolar_function")

    def test_correct_rank_assignment_heterogeneous_etcd(self):
        self.run_test_with_backend("etcd", "correct_rank_assignment_heterogeneous")

    def test_correct_rank_assignment_heterogeneous_etcd_v2(self):
        self.run_test_with_backend("etcd-v2", "correct_rank_assignment_heterogeneous")

    def test_correct_rank_assignment_homogeneous_etcd(self):
        self.run_test_with_backend("etcd", "correct_rank_assignment_homogeneous")

    def test_correct_rank_assignment_homogeneous_etcd_v2(self):
        self.run_test_with_backend("etcd-v2", "correct_rank_assignment_homogeneous")

    def test_double_agent_fault_tolerance_etcd(self):
        self.run_test_with_backend("etcd", "double_agent_fault_tolerance", torch=True)

    def test_double_agent_fault_tolerance_etcd_v2(self):
        self.run_test_with_backend("etcd-v2", "double_agent_fault_tolerance", torch=True)

    def test_no_exit_barrier_on_failure(self):
        self.skipTest("broken in torch 2.13 itself (run against torch's own modules: it hangs): both "
                      "agents get is_host=True, the second cannot bind the c10d port (EADDRINUSE, "
                      "RendezvousConnectionError) and the first waits out the join timeout for it; ours "
                      "does the same. torch's CI does not run this file")
        self.run_test_with_backend("c10d", "no_exit_barrier_on_failure")

    def test_double_agent_elastic_c10d(self):
        self.run_test_with_backend("c10d", "double_agent_elastic", torch=True)

    def test_double_agent_elastic_etcd(self):
        self.run_test_with_backend("etcd", "double_agent_elastic", torch=True)

    def test_double_agent_elastic_etcd_v2(self):
        self.run_test_with_backend("etcd-v2", "double_agent_elastic", torch=True)

    def test_torch_rpc_c10d(self):
        self.run_test_with_backend("c10d", "torch_rpc", torch=True)

    def test_torch_rpc_etcd(self):
        self.run_test_with_backend("etcd", "torch_rpc", torch=True)

    def test_torch_rpc_etcd_v2(self):
        self.run_test_with_backend("etcd-v2", "torch_rpc", torch=True)

    def test_workers_drift_success_etcd(self):
        self.run_test_with_backend("etcd", "workers_drift_success")

    def test_workers_drift_success_etcd_v2(self):
        self.run_test_with_backend("etcd-v2", "workers_drift_success")

    def test_workers_drift_fail_etcd(self):
        self.run_test_with_backend("etcd", "workers_drift_fail")

    def test_workers_drift_fail_etcd_v2(self):
        self.run_test_with_backend("etcd-v2", "workers_drift_fail")

    def test_barrier_failed_c10d(self):
        self.skipTest(_NO_BARRIER)
        self.run_test_with_backend("c10d", "barrier_failed")

    def test_barrier_failed_etcd(self):
        self.skipTest(_NO_BARRIER)
        self.run_test_with_backend("etcd", "barrier_failed")

    def test_barrier_failed_etcd_v2(self):
        self.run_test_with_backend("etcd-v2", "barrier_failed")

    def test_shutdown_called_c10d(self):
        self.skipTest("torch internal: start_processes and LocalElasticAgent._monitor_workers (the case "
                      "patches torch's process-context factory and asserts its close() is called once; "
                      "ours has no process context to patch)")
        self.run_test_with_backend("c10d", "shutdown_called")

    def test_shutdown_called_etcd(self):
        self.skipTest("torch internal: start_processes and LocalElasticAgent._monitor_workers (the case "
                      "patches torch's process-context factory and asserts its close() is called once; "
                      "ours has no process context to patch)")
        self.run_test_with_backend("etcd", "shutdown_called")

    def test_shutdown_called_etcd_v2(self):
        self.run_test_with_backend("etcd-v2", "shutdown_called")

    def test_rank_restart_after_failure(self):
        self.run_test_with_backend("c10d", "fail_rank_one_once", torch=True)
