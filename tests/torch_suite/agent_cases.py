"""The bodies of torch's local_elastic_agent_test.py, against our elastic and rendezvous modules.

    python agent_cases.py BODY BACKEND ENDPOINT

runs one body (``dummy_compute``, ``run_happy_function``...) with the given rendezvous backend and
endpoint, as torch's ``run_test_with_backend`` does, and exits 0 when it passed; otherwise it prints
the traceback and exits 1. test_torch_local_elastic_agent.py runs it in its own session, under the
torch venv's interpreter when the workers need torch (the agent itself never imports torch).
"Change one word": torch's agent, rendezvous and errors modules become ``elastic`` and ``rendezvous``.
"""
import json
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
import traceback
import unittest
import uuid
from dataclasses import dataclass
from typing import Callable, Tuple
from unittest import mock
from unittest.mock import Mock, patch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), HERE]

from agent_fns import (  # noqa: E402
    _bipolar_function, _bipolar_sleep_function, _check_env_function, _check_env_value,
    _check_local_watchdog_setup, _check_master_port_addr_override, _dist_sum, _echo, _get_role_info,
    _happy_function, _sad_function, _sleep, dummy_compute, dummy_compute_simulate_rank_failure,
    rpc_master, rpc_worker)

if os.environ.get("AGENT_CASES_REFERENCE") == "torch":
    # calibration only (never in the suite): the same bodies against torch's own modules, to tell a
    # case torch itself fails from one where we differ (torch does not run this file in its CI)
    import torch.distributed.elastic.agent.server.local_elastic_agent as elastic
    import torch.distributed.elastic.rendezvous.registry as rdzv_registry
    from torch.distributed.elastic.agent.server.api import RunResult, WorkerSpec, WorkerState
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    LocalElasticAgent = elastic.LocalElasticAgent
    _PATCH_TARGETS = {"barrier": "torch.distributed.elastic.utils.store.barrier",
                      "start_processes": "torch.distributed.elastic.agent.server.local_elastic_agent."
                                         "start_processes"}
else:
    import elastic  # noqa: E402
    import rendezvous as rdzv_registry  # noqa: E402
    from elastic import (  # noqa: E402
        ChildFailedError, DefaultLogsSpecs, LocalElasticAgent, RunResult, Std, WorkerSpec, WorkerState,
        record)
    from rendezvous import RendezvousParameters  # noqa: E402
    # torch patches torch.distributed.elastic.utils.store.barrier and local_elastic_agent.start_processes
    _PATCH_TARGETS = {"barrier": "elastic.barrier", "start_processes": "elastic.start_processes"}

mp = multiprocessing.get_context("fork")   # torch's default on Linux


def _const(name):
    """torch's local_elastic_agent module constants, looked up on ours when a case uses them."""
    return getattr(elastic, name)


@dataclass
class Conf:
    """The arguments of one agent (one simulated node)."""
    entrypoint: Callable
    local_world_size: int
    args: Tuple = ()
    role: str = "default"
    redirects: object = Std.NONE
    tee: object = Std.NONE


class LocalElasticAgentTest(unittest.TestCase):
    def setUp(self):
        self._test_dir = tempfile.mkdtemp(prefix=self.__class__.__name__)
        self._run_id = str(uuid.uuid4()).split("-")[0]

    def tearDown(self):
        shutil.rmtree(self._test_dir, ignore_errors=True)

    def log_dir(self):
        return tempfile.mkdtemp(prefix="torchelastic_", dir=self._test_dir)

    def get_worker_spec(self, node_config, min_nodes=1, max_nodes=1, max_restarts=0, monitor_interval=0.01,
                        master_addr_override=None, master_port_override=None, is_host=True):
        params = RendezvousParameters(backend=self._backend, endpoint=self._endpoint, run_id=self._run_id,
                                      min_nodes=min_nodes, max_nodes=max_nodes, is_host=is_host)
        handler = rdzv_registry.get_rendezvous_handler(params)
        return WorkerSpec(role=node_config.role, local_world_size=node_config.local_world_size,
                          entrypoint=node_config.entrypoint, args=node_config.args, rdzv_handler=handler,
                          max_restarts=max_restarts, monitor_interval=monitor_interval,
                          master_addr=master_addr_override, master_port=master_port_override)

    def get_agent(self, spec, node_config, start_method="spawn", exit_barrier_timeout=5,
                  log_line_prefix_template=None):
        return LocalElasticAgent(
            spec, start_method=start_method, exit_barrier_timeout=exit_barrier_timeout,
            logs_specs=DefaultLogsSpecs(log_dir=self.log_dir(), redirects=node_config.redirects,
                                        tee=node_config.tee),
            log_line_prefix_template=log_line_prefix_template)

    @record
    def run_agent(self, conf, agent_results=None, min_nodes=1, max_nodes=1, start_method="spawn",
                  max_restarts=0, exit_barrier_timeout=5, master_addr_override=None,
                  master_port_override=None, is_host=True, monitor_interval=0.01,
                  log_line_prefix_template=None):
        """One agent, here or in a child process (then its result goes to `agent_results`)."""
        spec = self.get_worker_spec(node_config=conf, min_nodes=min_nodes, max_nodes=max_nodes,
                                    max_restarts=max_restarts, master_addr_override=master_addr_override,
                                    master_port_override=master_port_override, is_host=is_host,
                                    monitor_interval=monitor_interval)
        agent = self.get_agent(spec=spec, node_config=conf, start_method=start_method,
                               exit_barrier_timeout=exit_barrier_timeout,
                               log_line_prefix_template=log_line_prefix_template)
        result = agent.run()
        spec.rdzv_handler.shutdown()
        if agent_results:
            agent_results.put((conf.role, result))
        if result.is_failed():
            raise ChildFailedError(spec.get_entrypoint_name(), result.failures)
        if not agent_results:
            return result

    def run_job(self, node_configs, exit_barrier_timeout=5, log_line_prefix_template=None):
        """A job of len(node_configs) agents, each in its own process."""
        nnodes = len(node_configs)
        agent_results = mp.Queue()
        procs = []
        for node_idx in reversed(range(nnodes)):
            kwargs = {"conf": node_configs[node_idx], "agent_results": agent_results, "min_nodes": nnodes,
                      "max_nodes": nnodes, "start_method": "spawn", "max_restarts": 0,
                      "exit_barrier_timeout": exit_barrier_timeout, "is_host": node_idx == 0,
                      "log_line_prefix_template": log_line_prefix_template}
            p = mp.Process(target=self.run_agent, kwargs=kwargs)
            procs.append(p)
            p.start()
        results, got = {}, 0
        while got < nnodes:   # drain while they run: a child with a result in the pipe cannot exit
            try:
                role, run_result = agent_results.get(timeout=0.5)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and agent_results.empty():
                    break
                continue
            results.setdefault(role, []).append(run_result)
            got += 1
        for p in procs:
            p.join()
        return results

    # -- the bodies torch's test methods run with a backend

    def dummy_compute(self):
        import torch
        res = self.run_agent(Conf(entrypoint=dummy_compute, local_world_size=2))
        self.assertFalse(res.is_failed())
        for return_value in res.return_values.values():
            self.assertIsInstance(return_value, torch.Tensor)
            self.assertEqual((100, 100), return_value.shape)

    def run_happy_function(self):
        res = self.run_agent(Conf(entrypoint=_happy_function, local_world_size=2))
        self.assertFalse(res.is_failed())
        self.assertIsNone(res.return_values[0])
        self.assertIsNone(res.return_values[1])

    def check_master_addr_port_override(self):
        master_addr, master_port = "test_host", 42
        res = self.run_agent(Conf(entrypoint=_check_master_port_addr_override, args=(master_addr, master_port),
                                  local_world_size=1),
                             master_addr_override=master_addr, master_port_override=master_port)
        self.assertFalse(res.is_failed())
        self.assertIsNone(res.return_values[0])

    def run_check_env_function(self):
        res = self.run_agent(Conf(entrypoint=_check_env_function, local_world_size=1))
        self.assertFalse(res.is_failed())

    def run_check_nccl_async_error_handling_env(self):
        with patch.dict(os.environ, {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}):
            res = self.run_agent(Conf(entrypoint=_check_env_value, local_world_size=1,
                                      args=("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")))
            self.assertFalse(res.is_failed())

    def run_check_nccl_async_error_handling_env_default(self):
        res = self.run_agent(Conf(entrypoint=_check_env_value, local_world_size=1,
                                  args=("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")))
        self.assertFalse(res.is_failed())

    def _run_env_check(self, name, should_exist):
        node_conf = Conf(entrypoint=_check_local_watchdog_setup, local_world_size=1, args=(name, should_exist))
        spec = self.get_worker_spec(node_conf, max_restarts=2)
        agent = self.get_agent(spec, node_config=node_conf)
        res = agent.run()
        self.assertFalse(res.is_failed())

    def run_agent_local_watchdog_setup_enabled(self):
        name = _const("TORCHELASTIC_TIMER_FILE")
        os.environ[name] = "/tmp/watchdog_timer_" + str(uuid.uuid4())
        self._run_env_check(name, True)

    def run_agent_local_watchdog_setup_disabled(self):
        name = _const("TORCHELASTIC_TIMER_FILE")
        os.environ.pop(name, None)
        self._run_env_check(name, False)

    def run_agent_healthcheck_setup_enabled(self):
        name = _const("TORCHELASTIC_HEALTH_CHECK_PORT")
        os.environ[name] = "12345"
        self._run_env_check(name, True)

    def run_agent_healthcheck_setup_disabled(self):
        name = _const("TORCHELASTIC_HEALTH_CHECK_PORT")
        os.environ.pop(name, None)
        self._run_env_check(name, False)

    def run_function_with_return_value(self):
        res = self.run_agent(Conf(entrypoint=_echo, args=("foo",), local_world_size=2))
        self.assertFalse(res.is_failed())
        self.assertEqual("foo", res.return_values[0])
        self.assertEqual("foo", res.return_values[1])

    def simple_dist_sum(self):
        res = self.run_agent(Conf(entrypoint=_dist_sum, local_world_size=2))
        self.assertFalse(res.is_failed())   # _dist_sum checks the sum itself

    def run_distributed_sum_homogeneous(self, log_line_prefix_template=None):
        node_configs = [Conf(role="sum", entrypoint=_dist_sum, local_world_size=4, tee=Std.ALL),
                        Conf(role="sum", entrypoint=_dist_sum, local_world_size=4, tee=Std.ALL)]
        res = self.run_job(node_configs, log_line_prefix_template=log_line_prefix_template)
        self.assertEqual(2, len(res["sum"]))
        ranks = set()
        for run_results in res["sum"]:
            self.assertFalse(run_results.is_failed())
            ranks.update(run_results.return_values.keys())
        self.assertSetEqual(set(range(4 + 4)), ranks)

    def run_with_custom_log_lines(self):
        self.run_distributed_sum_homogeneous("[${role_name}-${local_rank}:${rank}]:")

    def run_distributed_sum_heterogeneous(self):
        node_configs = [Conf(role="sum", entrypoint=_dist_sum, local_world_size=n) for n in (1, 2, 3)]
        res = self.run_job(node_configs)
        self.assertEqual(3, len(res["sum"]))
        ranks = set()
        for run_results in res["sum"]:
            self.assertFalse(run_results.is_failed())
            ranks.update(run_results.return_values.keys())
        self.assertSetEqual(set(range(1 + 2 + 3)), ranks)

    def run_sad_function(self):
        replyfile = os.path.join(self._test_dir, "error.json")
        with mock.patch.dict(os.environ, {"TORCHELASTIC_ERROR_FILE": replyfile}):
            with self.assertRaises(ChildFailedError) as cm:
                self.run_agent(Conf(entrypoint=_sad_function, local_world_size=2))
            rank, failure = cm.exception.get_first_failure()
            failure_data = failure.error_file_data["message"]
            with open(replyfile) as fp:
                data = json.load(fp)["message"]
            self.assertTrue(rank in {0, 1})
            self.assertTrue(failure.local_rank in {0, 1})
            self.assertEqual(1, failure.exitcode)
            self.assertEqual(data["message"], failure_data["message"])
            self.assertEqual(int(data["extraInfo"]["timestamp"]), failure.timestamp)

    def run_bipolar_function(self):
        node_conf = Conf(entrypoint=_bipolar_function, local_world_size=4)
        spec = self.get_worker_spec(node_conf, max_restarts=2)
        agent = self.get_agent(spec, node_config=node_conf)
        run_result = agent.run()
        self.assertTrue(run_result.is_failed())
        self.assertEqual(0, agent._remaining_restarts)
        self.assertEqual(WorkerState.FAILED, agent.get_worker_group().state)
        self.assertTrue(agent._total_execution_time > 0)

    def _rank_assignment(self, node_configs, expected_role_world_sizes, agents_per_role):
        results = self.run_job(node_configs)
        print("job result: %s" % results)
        for role, n in agents_per_role.items():
            self.assertEqual(n, len(results[role]))
        self.assert_rank_consistency(results, expected_role_world_sizes)

    def correct_rank_assignment_heterogeneous(self):
        sizes = [("master", 8), ("trainer", 1), ("trainer", 2), ("trainer", 3), ("trainer", 4), ("ps", 5),
                 ("ps", 2)]
        self._rank_assignment([Conf(role=r, entrypoint=_get_role_info, local_world_size=n) for r, n in sizes],
                              {"master": 8, "trainer": 1 + 2 + 3 + 4, "ps": 5 + 2},
                              {"master": 1, "trainer": 4, "ps": 2})

    def correct_rank_assignment_homogeneous(self):
        sizes = [("master", 1), ("trainer", 4), ("trainer", 4), ("trainer", 4), ("trainer", 4), ("ps", 3),
                 ("ps", 3)]
        self._rank_assignment([Conf(role=r, entrypoint=_get_role_info, local_world_size=n) for r, n in sizes],
                              {"master": 1, "trainer": 4 * 4, "ps": 3 * 2},
                              {"master": 1, "trainer": 4, "ps": 2})

    def assert_rank_consistency(self, run_results, expected_role_world_sizes):
        """Global ranks 0..N-1; role ranks 0..role size-1; each agent's ranks and role ranks consecutive."""
        global_ranks, role_ranks, grouped_ranks = [], {}, {}
        expected_world_size = sum(expected_role_world_sizes.values())
        for role, results in run_results.items():
            for result in results:
                for info in result.return_values.values():
                    self.assertEqual(expected_world_size, info.world_size)
                    self.assertEqual(expected_role_world_sizes[role], info.role_world_size)
                    grouped_ranks.setdefault(info.group_rank, []).append((info.rank, info.role_rank))
                    role_ranks.setdefault(role, []).append(info.role_rank)
                    global_ranks.append(info.rank)
        self.assertEqual(list(range(expected_world_size)), sorted(global_ranks))
        for role, size in expected_role_world_sizes.items():
            self.assertEqual(list(range(size)), sorted(role_ranks[role]))
        for pairs in grouped_ranks.values():
            for idx in (0, 1):
                ranks = sorted(p[idx] for p in pairs)
                self.assertEqual(list(range(ranks[0], ranks[-1] + 1)), ranks)

    def _agents(self, agent_args, n):
        procs = [mp.Process(target=self.run_agent, kwargs=agent_args) for _ in range(n)]
        for p in procs:
            p.start()
        return procs

    def double_agent_fault_tolerance(self):
        """Two agents; kill the odd one and start it again: the job still succeeds."""
        nnodes, wait = 2, 2
        agent_args = {"conf": Conf(entrypoint=_dist_sum, args=(wait,), local_world_size=2),
                      "agent_results": mp.Queue(), "min_nodes": nnodes, "max_nodes": nnodes, "max_restarts": 2}
        procs = self._agents(agent_args, nnodes)
        for i in range(nnodes):
            if i % 2 != 0:
                procs[i].kill()
                procs[i] = self._agents(agent_args, 1)[0]
        for p in procs:
            p.join()
            self.assertEqual(0, p.exitcode)

    def no_exit_barrier_on_failure(self):
        """A failed job does not wait out the exit barrier: both agents end close together."""
        nnodes, wait, monitor_interval_s = 2, 20, 0.5
        agent_args = {"conf": Conf(entrypoint=_bipolar_sleep_function, args=(wait,), local_world_size=2),
                      "agent_results": mp.Queue(), "min_nodes": nnodes, "max_nodes": nnodes, "max_restarts": 0,
                      "exit_barrier_timeout": 300, "monitor_interval": monitor_interval_s}
        procs = self._agents(agent_args, nnodes)
        exit_interval_between_agents = 0
        for p in procs:
            p.join()
            self.assertNotEqual(0, p.exitcode)
            exit_interval_between_agents = time.monotonic() - exit_interval_between_agents
        self.assertGreater(2 * monitor_interval_s, exit_interval_between_agents,
                           "Agents are not cleaned up until 2 * monitor_interval")

    def double_agent_elastic(self):
        """min 1, max 2 agents; kill the odd one (no restart): the other finishes (scale-down)."""
        min_nodes, max_nodes, wait = 1, 2, 2
        agent_args = {"conf": Conf(entrypoint=_dist_sum, args=(wait,), local_world_size=2),
                      "agent_results": mp.Queue(), "min_nodes": min_nodes, "max_nodes": max_nodes,
                      "max_restarts": 2}
        procs = self._agents(agent_args, max_nodes)
        for i in range(max_nodes):
            if i % 2 != 0:
                procs[i].kill()
        for i, p in enumerate(procs):
            p.join()
            self.assertEqual(0 if i % 2 == 0 else -signal.SIGKILL, p.exitcode)

    def torch_rpc(self):
        msg = "hello world"
        results = self.run_job([
            Conf(role="master", entrypoint=rpc_master, args=(msg,), local_world_size=1, tee=Std.ALL),
            Conf(role="worker", entrypoint=rpc_worker, args=(), local_world_size=1, tee=Std.ALL)])
        self.assertEqual(["%s from worker" % msg], list(results["master"][0].return_values.values()))

    def _drift(self, seconds, exit_barrier_timeout):
        results = self.run_job([Conf(role="zzz", entrypoint=_sleep, args=(0,), local_world_size=1),
                                Conf(role="zzz", entrypoint=_sleep, args=(seconds,), local_world_size=1)],
                               exit_barrier_timeout=exit_barrier_timeout)
        for i in range(2):
            run_results = results["zzz"][i]
            self.assertFalse(run_results.is_failed())
            for rank, output in run_results.return_values.items():
                self.assertEqual(rank, output)   # _sleep returns its rank

    def workers_drift_success(self):
        """Two agents finish 2 s apart with an exit barrier timeout of 4 s."""
        self._drift(2, 4)

    def workers_drift_fail(self):
        """Two agents finish 4 s apart with an exit barrier timeout of 0: the job still succeeds."""
        self._drift(4, 0)

    def barrier_failed(self):
        """A failing exit barrier does not fail the job."""
        with patch(_PATCH_TARGETS["barrier"]) as barrier_mock:
            barrier_mock.side_effect = RuntimeError("test error")
            res = self.run_agent(Conf(entrypoint=_happy_function, local_world_size=1))
            self.assertFalse(res.is_failed())
            barrier_mock.assert_called_once()

    def shutdown_called(self):
        with patch(_PATCH_TARGETS["start_processes"]) as start_processes_mock:
            pcontext_mock = Mock()
            pcontext_mock.pids.return_value = {0: 0}
            start_processes_mock.return_value = pcontext_mock
            node_conf = Conf(entrypoint=_happy_function, local_world_size=1)
            spec = self.get_worker_spec(node_conf, max_restarts=0)
            agent = self.get_agent(spec, node_config=node_conf)
            with patch.object(agent, "_monitor_workers") as monitor_mock:
                monitor_mock.return_value = RunResult(state=WorkerState.SUCCEEDED, return_values={0: 0})
                agent.run("worker")
            pcontext_mock.close.assert_called_once()

    def fail_rank_one_once(self):
        import torch
        res = self.run_agent(Conf(entrypoint=dummy_compute_simulate_rank_failure, local_world_size=2),
                             max_restarts=3)
        self.assertFalse(res.is_failed())
        for return_value in res.return_values.values():
            self.assertIsInstance(return_value, torch.Tensor)
            self.assertEqual((100, 100), return_value.shape)


def main(body, backend, endpoint):
    case = LocalElasticAgentTest()
    case._backend, case._endpoint = backend, endpoint
    case.setUp()
    passed = False
    try:
        getattr(case, body)()
        passed = True
    except BaseException:
        traceback.print_exc()
    finally:
        case.tearDown()
    print("CASE PASSED" if passed else "CASE FAILED")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if passed else 1)   # no interpreter teardown: agents' children are already gone


if __name__ == "__main__":
    main(*sys.argv[1:4])
