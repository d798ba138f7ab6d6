"""Worker entrypoints of torch's local_elastic_agent_test.py, our versions. They run in the agent's
multiprocessing children; the ones that use torch import it when called (torch venv only)."""
import os
import time
from dataclasses import dataclass


def init_rpc(name, backend):
    import torch.distributed.rpc as rpc
    rpc.init_rpc(name=name, backend=backend, rank=int(os.environ["RANK"]),
                 world_size=int(os.environ["WORLD_SIZE"]))


def rpc_master(msg):
    import torch.distributed.rpc as rpc
    from torch.distributed.rpc.backend_registry import BackendType
    init_rpc("master", BackendType.TENSORPIPE)
    ret = rpc.rpc_sync(to="worker", func=_echo, args=(msg,))
    rpc.shutdown()
    return "%s from worker" % ret


def rpc_worker():
    import torch.distributed.rpc as rpc
    from torch.distributed.rpc.backend_registry import BackendType
    init_rpc("worker", BackendType.TENSORPIPE)
    rpc.shutdown()


def _happy_function():
    return


def _sad_function():
    raise RuntimeError("sad because i throw")


def dummy_compute():
    """A random 100x100 tensor."""
    import torch
    return torch.rand(100, 100)


def dummy_compute_simulate_rank_failure():
    """Rank 1 kills itself on the first attempt; otherwise a random 100x100 tensor."""
    import torch
    if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os.kill(os.getpid(), 9)
    return torch.rand(100, 100)


def _check_master_port_addr_override(expected_master_addr, expected_master_port):
    actual_addr = os.environ["MASTER_ADDR"]
    actual_port = int(os.environ["MASTER_PORT"])
    # torch's condition, `and` included: it fails only when both differ
    if expected_master_addr != actual_addr and expected_master_port != actual_port:
        raise RuntimeError("Expected addr: %s:%s, got addr: %s:%s"
                           % (expected_master_addr, expected_master_port, actual_addr, actual_port))


def _bipolar_function():
    if int(os.environ["RANK"]) % 2 == 0:
        _happy_function()
    else:
        _sad_function()


def _bipolar_sleep_function(sleep_sec):
    if int(os.environ["RANK"]) % 2 == 0:
        _sleep(sleep_sec)
    else:
        _sad_function()


def _dist_sum(wait=0):
    import torch
    import torch.distributed as dist
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    dist.init_process_group(backend="gloo")
    t = torch.tensor(rank)
    time.sleep(wait)
    dist.all_reduce(t, op=dist.reduce_op.SUM)
    expected = sum(range(world_size))
    if expected != t.item():
        raise RuntimeError("Expected rank sum %d, got %d" % (expected, t.item()))


def _sleep(sleep_sec):
    time.sleep(sleep_sec)
    return int(os.environ["RANK"])


@dataclass
class RankInfo:
    rank: int
    role_rank: int
    group_rank: int
    role_world_size: int
    world_size: int


def _get_role_info():
    e = os.environ
    return RankInfo(int(e["RANK"]), int(e["ROLE_RANK"]), int(e["GROUP_RANK"]), int(e["ROLE_WORLD_SIZE"]),
                    int(e["WORLD_SIZE"]))


def _echo(msg):
    return msg


def _check_env_function():
    for name in ("RANK", "LOCAL_RANK", "ROLE_RANK", "ROLE_NAME", "GROUP_RANK", "LOCAL_WORLD_SIZE",
                 "ROLE_WORLD_SIZE", "WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID",
                 "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
        os.environ[name]   # KeyError when missing


def _check_env_value(key, expected):
    if key not in os.environ:
        raise RuntimeError("Environment variable %s not found in os.environ" % key)
    actual = os.getenv(key)
    if expected != actual:
        raise RuntimeError("os.environ['%s']=%s does not equal the expected value: %s"
                           % (key, actual, expected))


def _check_local_watchdog_setup(key, should_exist):
    if should_exist and key not in os.environ:
        raise RuntimeError("Environment variable %s not found in os.environ" % key)
    if not should_exist and key in os.environ:
        raise RuntimeError("Environment variable %s found in os.environ" % key)
