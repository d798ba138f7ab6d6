"""Callables the agent tests run as workers (importable by spawned children: tests/ is on sys.path)."""
import os
import signal
import time

ENV_KEYS = (
    "LOCAL_RANK", "RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
    "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "OMP_NUM_THREADS",
)


def happy():
    return None


def echo(value):
    return value


def rank_times(factor):
    return int(os.environ["RANK"]) * factor


def big_value(size):
    return os.environ["RANK"].encode() * size


def env_dump():
    return {k: os.environ.get(k) for k in ENV_KEYS}


def sad():
    raise RuntimeError("sad worker %s" % os.environ["RANK"])


def bipolar():
    if int(os.environ["RANK"]) % 2 == 0:
        sad()
    return int(os.environ["TORCHELASTIC_RESTART_COUNT"])


def kill_self_first_attempt():
    """Rank 1 SIGKILLs itself on the first attempt; every rank succeeds after the restart."""
    if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return (int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"]))


def sleep_then(seconds, code=0):
    time.sleep(seconds)
    if code:
        raise SystemExit(code)
    return seconds


def stuck_here():
    time.sleep(60)


def hung_in_stuck_here():
    """Overruns a 1 s file-timer scope inside stuck_here() (the file timer kills it)."""
    import elastic
    with elastic.expires(after=1):
        stuck_here()
