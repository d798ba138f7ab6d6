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


def _unreadable():
    raise FileNotFoundError("the storage behind this value is gone")


class Unreadable:
    """Pickles fine in the worker; unpickling it in the agent fails (as a torch tensor whose
    shared memory went away with its worker does)."""

    def __reduce__(self):
        return _unreadable, ()


def unreadable_on_rank_1():
    return Unreadable() if os.environ["RANK"] == "1" else "fine"


def first_returns_early(pid_file):
    """Rank 0 returns at once (after noting its pid); rank 1 returns once rank 0's process is gone,
    or after 3 s: with it still there then, rank 0 was held until every rank had returned."""
    if os.environ["RANK"] == "0":
        with open(pid_file + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(pid_file + ".tmp", pid_file)
        return "returned"
    while not os.path.exists(pid_file):
        time.sleep(0.01)
    with open(pid_file) as f:
        pid = int(f.read())
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "rank 0 exited before rank 1 returned"
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return "rank 0 exited before rank 1 returned"
        time.sleep(0.01)
    return "rank 0 held"


def _write_at_exit(path):
    with open(path, "w") as f:
        f.write("atexit ran")


def registers_atexit(folder):
    """An atexit handler of the worker's own: it runs when the worker leaves."""
    import atexit
    atexit.register(_write_at_exit, os.path.join(folder, "atexit.%s" % os.environ["RANK"]))
    return "registered"


def stuck_here():
    time.sleep(60)


def hung_in_stuck_here():
    """Overruns a 1 s file-timer scope inside stuck_here() (the file timer kills it)."""
    import elastic
    with elastic.expires(after=1):
        stuck_here()
