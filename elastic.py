#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""The elastic agent and the ``elasticrun`` launcher: torchrun without PyTorch in the launcher.

Standard library only, plus its siblings ``store`` and ``rendezvous`` (``store`` <- ``rendezvous`` <-
``elastic``). Usage is torchrun's::

    $ python3 elastic.py --standalone --nproc-per-node 2 train.py --lr 0.1
    $ python3 -m elastic --nnodes 2 --rdzv-backend c10d --rdzv-endpoint host0:29400 -m pkg.train
    $ elasticrun --nnodes 1:4 --max-restarts 3 --rdzv-backend c10d --rdzv-endpoint host0 train.py
    $ elasticrun stacks --rdzv-endpoint host0:29400 --rdzv-id job42   # every rank's stack, grouped

and from Python::

    from elastic import LocalElasticAgent, WorkerSpec
    result = LocalElasticAgent(WorkerSpec("trainer", 4, train_fn, args=(cfg,))).run()
    result.return_values        # {global_rank: what train_fn returned}

Data flow of one agent (one per node)::

    main() -- options --> _LaunchConfig --> WorkerSpec + LocalElasticAgent(public keywords).run()
                                   |
        +--------------------------+  one round per pass of the policy loop
        v
    handler.next_rendezvous() -> info (store, rank, world_size, master_addr, master_port)
        |  every agent writes role/<group_rank> to info.store and reads all: a _RankAssignment
        v
    _WorkerGroup.start(): each worker in its own session, through a starter:
        |  Python scripts ........ `python -u -c <stub> SCRIPT ARGS`, a new interpreter as torchrun's
        |                          (its flags, sys.path, a command line showing the script); the stub
        |                          runs a bootstrap (excepthook, line-buffered stdio). CLI only, with
        |                          ELASTICRUN_FORKSERVER=1: forked by the fork server instead
        |  programs .............. subprocesses (--no-python, WorkerSpec(entrypoint="path"))
        |  callables ............. multiprocessing children (spawn/fork/forkserver, --run-path);
        |                          each sends its value back and waits until every rank has
        |                          (torch tensors are read from their sender's shared memory)
        |  each behind one handle: pid, wait_fd, poll(), wait(), signal()
        |  stdout/stderr -> console | log file | tee (the worker writes its log file; a pump
        |                          thread tails it to the console with the line prefix); every
        |                          kind of Python worker writes whole lines (line-buffered stdio)
        v
    monitor (wakes on a worker's exit, at latest every monitor_interval):
        all exited 0 ............ SUCCEEDED; exit barrier on info.store (on its timeout a node
                                  leaves, marked finished in the round, not lost; the store's
                                  host stays until the others are done or lost)
        a worker failed ......... UNHEALTHY; stop the group; publish failures to info.store and
                                  read the job's; restart while max_restarts allows, else FAILED
                                  (every node gives up together)
        a peer's failure ........ same as a local failure (restart counts stay equal job-wide)
        this node's worker the
        root cause, K-th time ... with --rdzv-conf exclude_after=K (within exclude_window): the node
                                  leaves instead of restarting, excluded from the run for
                                  exclude_cooldown; the launcher exits 75 (also when an excluded
                                  host comes back too soon); a spare takes its place
        nodes waiting / member
        dead (round broken) ..... UNHEALTHY; stop the group and re-rendezvous, budget untouched
        the store lost .......... stop the group; the launcher exits 1 ("lost the store")
        a stop signal ........... STOPPED; tell every node (Job control), stop the group; run()
                                  raises, main() exits 128+N; a node told of it does the same
    RunResult (state, return values, every failure of the last attempt, root cause) -> main()'s
    report and exit status, and nothing else

States (``WorkerState``), set in one place (``LocalElasticAgent._set_state``), moves in
``_TRANSITIONS``: UNKNOWN (built, not run) -> INIT (rendezvous) -> HEALTHY (workers running) ->
SUCCEEDED | UNHEALTHY (tearing down to restart) | STOPPED (a stop signal) | FAILED; UNHEALTHY ->
INIT | FAILED | STOPPED. ``/healthz`` reads only this state.

Mistakes refused (exit 2, one line naming both values): a node whose --nnodes, or whose
--nproc-per-node or script line (path and arguments, checksummed) differ from those of the run's
nodes of its --role; a run id whose run has finished (one node or many: a job's end closes its run);
--standalone with --nnodes above 1.

Nodes agree on the outcome: a node that gives up marks it in the store, and the node serving the
store keeps it up until every member has seen it (bounded: shutdown_timeout + 30 s).

Failure policy in one sentence: the first worker to fail (earliest across the whole job, ties by
global rank) is the root cause, its exit code is the launcher's (signal N gives 128+N), and workers
the agent stopped itself are never reported as failures.

Teardown, on every stop: the signal (SIGTERM, or the one the launcher received) to each worker's
process group, ``shutdown_timeout`` seconds of grace, SIGKILL to the group, reap. Workers also die
when the agent is SIGKILLed: each worker has PR_SET_PDEATHSIG, and a forked watchdog holding a pipe
from the agent SIGKILLs every live worker group when that pipe reaches end-of-file. A worker's
descendant that left its group (a daemon, ``setsid cmd &``) is found by its environment: workers
get ``ELASTICRUN_TREE`` holding a token unique to the agent, every program they start inherits it,
and both teardown (same signal, same grace) and the watchdog also kill this user's processes whose
/proc/<pid>/environ carries the token. A process forked *without exec* shows the environment its
line was exec'd with: below a script worker (a new interpreter) that carries the token, but below a
worker that was itself forked it is the launcher's, so forked workers have a subreaper
(PR_SET_CHILD_SUBREAPER) above them: the fork server for its script workers, the launcher itself for
``--run-path`` ones. An orphan below it stays below it, and teardown signals and kills every process
it finds there too (the fork server, which leaves when the agent's socket closes, kills them before
it goes, also after a SIGKILLed agent).

Error channel: each worker gets ``TORCHELASTIC_ERROR_FILE``; ``record`` (and, for Python script
workers, an excepthook installed by a small bootstrap) writes torchelastic's JSON there atomically::

    {"message": {"message": "<Type>: <text>",
                 "extraInfo": {"py_callstack": "<traceback>", "timestamp": "<epoch s>"}}}

The agent reads it without blocking, only when it is a regular file, and at most its last 1 MiB.
A worker the agent kills (file timer, or SIGKILL after the grace) writes none: the agent writes it
for the worker, with the worker's stack in ``extraInfo.stack`` (see Stacks), and the launcher's
own error file carries that too. ``ErrorHandler`` is torch's object for the same (``initialize``,
``record_exception``, ``dump_error_file``); ``ProcessFailure`` raises ValueError on an error file
that is not this JSON, as torch's does, and the agent reports that worker all the same.

Stacks: Python workers (scripts through the bootstrap or the fork server, callables) arm
``faulthandler.register(STACK_SIGNAL, all_threads=True)`` at start, writing to ``stack.txt`` beside
their error file (``ELASTICRUN_STACK_FILE``, which appears once armed; ``ELASTICRUN_STACK_SIGNAL``).
The stack signal is ``SIGRTMIN+6`` (``ELASTICRUN_STACK_SIGNAL=NAME|SIGRTMIN+N|N|off`` overrides;
not SIGUSR1/SIGUSR2, which Slurm's ``--signal`` and checkpointing code use, nor SIGQUIT). Before the
file timer kills a worker and before teardown SIGKILLs one that outlived its grace, the agent sends
it the stack signal and waits up to 1 s for the dump to stop growing; the report's ``stack`` lines,
its message (``in stuck_here (train.py:12)``) and the error files carry it. A program worker
(``--no-python``) is never sent it: "not a Python worker: no stack".

Job control: every agent of a job (on a rendezvous handler with a store) watches numbered events
on that store (``elasticrun/<run id>/ctl/<n>``, one parked wait per agent, no traffic while idle)::

    stop N ...... a stop signal (--signals-to-handle) reached one agent: every agent stops as if it
                  had received N (own grace per worker; every node exits 128+N)
    signal N .... SIGUSR1/SIGUSR2 (ELASTICRUN_FORWARD_SIGNALS) reached one agent: forwarded to every
                  worker of every node, nothing stops; once per signal per 2 s per agent (under
                  Slurm every agent receives it as well as hearing of it)
    stacks ...... every agent answers with its workers' stacks (``elasticrun stacks``, or the stack
                  signal sent to any agent, which logs them), grouped by identical stack

File timer (hang watchdog), on with ``TORCHELASTIC_ENABLE_FILE_TIMER=1`` (a pipe in the run's log
folder) or ``TORCHELASTIC_TIMER_FILE=PATH``. Workers get ``TORCHELASTIC_TIMER_FILE`` and guard a step
with ``with elastic.expires(after=60): step()`` (torch's ``FileTimerClient`` works too: same pipe,
same format). Each request is one JSON line (``FileTimerRequest(...).to_json()``, for clients of
one's own), written in one ``write`` of at most PIPE_BUF bytes::

    worker                                              agent (FileTimerServer thread)
      {"version": 1, "pid": P, "scope_id": S,  --FIFO-->  timers[(P, S)] = (T, N); sleeps in poll
       "expiration_time": T, "signal": N}                 until a request, the nearest T, or P's exit
      ... overruns T ...                                  kill(P, N): a worker failure whose report
                                                          names S; restart while the budget allows
      {..., "expiration_time": -1, "signal": 0}           release: timers.pop((P, S))

Every (pid, scope) keeps its own timer (nested scopes never replace each other); timers of dead
processes are dropped; every field is range-checked and a bad line is skipped and logged (a burst,
then one summary per interval); the agent signals only its live workers and their sessions, never
itself, and nobody while it has no workers. The pipe is locked (``PATH.lock``): a second launcher
given the same ``TORCHELASTIC_TIMER_FILE`` exits 2; a pipe left by a dead one is reused.

Health check: with ``--health-check-port P`` (or ``TORCHELASTIC_HEALTH_CHECK_PORT``; 0 picks a free
port, logged at start) the agent answers ``GET /healthz`` from one thread (non-blocking sockets, 5 s
per request, at most 64 clients at once): 200 while the group is HEALTHY (or SUCCEEDED), 503
during rendezvous, restarts and a stop (STOPPED), with a JSON body ``{"state", "restart_count",
"group_rank", "group_world_size", "world_size" (workers, as WORLD_SIZE), "last_progress_time",
"healthy"}``.

Slurm: ``srun --ntasks-per-node=1 elasticrun --slurm --nproc-per-node 4 train.py`` takes nnodes,
the node rank, the c10d endpoint (first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST, port
29400; compressed lists such as ``gpu[001-004,010]`` are expanded) and the run id (job.step) from
srun's environment; options given on the command line or as PET_* win. A multi-node job whose
endpoint would be a loopback address is refused (exit 2) instead of every node meeting itself.

Worker placement (torchrun 2.13's options): ``--numa-binding MODE`` binds each worker, in the worker
before its code runs, to the CPUs ``_numa_plan`` picks from ``/sys/devices/system`` (the NUMA node of
the worker's GPU, from ``nvidia-smi`` and ``/sys/bus/pci``; without GPUs local ranks are spread over
the nodes in blocks); the set travels in ``ELASTICRUN_CPUS``, which the worker drops before the
script runs. ``--virtual-local-rank`` gives each worker LOCAL_RANK=0 and only its GPU in
CUDA_VISIBLE_DEVICES. ``--duplicate-std{out,err}-filters`` copy tee'd lines holding a filter to
``filtered_std{out,err}.log`` in the attempt's folder (the log pump writes them).

Pre-flight check: ``elasticrun --check [the job's options] SCRIPT [ARGS]`` on every node (``srun
elasticrun --check --slurm ... train.py``) starts no worker. The nodes meet through the job's own
rendezvous backend under the run id ``<run id>.check`` (the job's run is never joined or closed), the
node serving the store (else rank 0) prints one table, one row a node, and every node exits 0 when
nothing failed anywhere, else 1; each failed line says what to do. Checked: the endpoint resolves
and is reachable from every node (with the local address, interface and address family that reach
it); each node's advertised address (``--local-addr`` or the host name: what MASTER_ADDR is when it
is rank 0) resolves, is not loopback in a multi-host job, and is reachable from the store host, which
connects back to a listener each node opens for the check; the clock offset of each node against
the store host (NTP-style over that connection, in ms; a warning beyond 0.1 s, a failure beyond 1 s);
the rendezvous port served on its host and ``--master-port``, when given, free on the rank-0 node;
the same Python version, elasticrun version and code digest, script checksum and arguments on every
node (compared with the most common value); the log folder (``--log-dir`` or the temp folder)
writable with 100 MiB free; GPUs visible (``nvidia-smi -L`` narrowed by ``CUDA_VISIBLE_DEVICES``) and
CPUs in the affinity mask enough for ``--nproc-per-node``. A node that cannot meet the others prints
its own row and why, and exits 1.

Console: every launcher line (elastic's, rendezvous's and store's loggers, through the one handler
main() installs) reads ``2026-12-07T14:03:07.125+01:00 [elasticrun] text``: ISO 8601 local time with
its UTC offset and milliseconds, as syslog (RFC 5424) and Slurm's iso8601_ms write; ``WARNING:`` or
``ERROR:`` before the text when it is one. ``LOGLEVEL`` (a name or a number, INFO by default) works
as in torchrun. Worker output keeps its own prefix template. A launcher line never continues a
worker's unterminated last line: a Python worker ends it as it exits (and before its traceback),
whatever its output is; the launcher ends any other's when the output is a regular file (a Slurm
output file, a redirect), which it can read back.

Stopping: "stopping 8 workers (SIGTERM), waiting up to 30 s; send the signal again to kill now". A
second stop signal during the grace period kills the workers (SIGKILL) at once; workers still alive
when the grace runs out are named before they are killed.

Event log (``--event-log PATH``; by default ``events.jsonl`` in the run's log folder, which is then
kept; ``--event-log none`` turns it off; ``LocalElasticAgent(event_log=PATH or True)``): one JSON
object a line, written and fsync'd as each event happens; the console lines are printed from the
same events, so the two never disagree. Every event has ``time`` (epoch seconds, ms), ``event``,
``run_id`` and ``host`` (this node's host name); the others add::

    start           version backend endpoint nnodes nproc max_restarts log_dir event_log addr pid role
    rendezvous      why: start | failure | peer failure | nodes waiting | member lost
    round           round nodes world_size (workers) group_rank ranks [first, last] master duration
                    (seconds in rendezvous) members [{addr, id, ranks}]
    scale_change    from_nodes to_nodes                       (a round of another size than the last)
    worker_started  rank local_rank pid attempt
    worker_exited   rank local_rank pid code signal (one of the two is null) by_agent attempt
    succeeded       workers
    failure         rank local_rank failure_host pid code signal message failure_time error_file
                    (null unless it exists) stderr_log failures (how many in the job)  (the root cause)
    node_lost       round reason                              (a member died or left)
    restart         why count max [rank]                      (count: job-wide restarts)
    restarted       why total detect stop rendezvous start    (seconds: the failure to its detection,
                    to the old group stopped and failures exchanged, to the new round, to workers started)
    gave_up         max
    stop_signal     signal
    stopping        workers signal grace can_hurry ranks
    kill            why: grace over | second signal; grace signal alive [{rank, pid}]
    exit            state code (the launcher's exit status) restarts workers_started elapsed
                    [signal] [error]

Status: ``elasticrun status --rdzv-endpoint H:P --rdzv-id ID [--json]`` reads a live run from its
store (``rendezvous.describe_run`` for the rounds, members, heartbeats and waiting nodes; the
agents' own ``agent/<group rank>``, ``role/<group rank>`` and ``failure/<group rank>`` keys in each
round's store for hosts, pids, ranks, restarts and failures) with ``check``, ``get`` and
``multi_get`` only: it never joins or changes the run, and takes ``--rdzv-conf token_file=...``.

Sections, in order: States, streams, specs; Error channel; Process plumbing; Python workers (the
bootstrap and the fork server); Worker processes (the handles and starters); Worker group; Local
rendezvous; Events; Agent; Stacks; Job control; File timer: worker side; File timer: server;
Health check; Slurm; Pre-flight check; Command line.

Borrowed private helpers, and only these: from ``store`` the ones its docstring lists
(``_recv_exactly``, ``_Pace`` and ``_read_token_file`` here); from ``rendezvous`` ``_BACKENDS``
(the launcher asks it for the backend names) and ``_free_port``. Nothing above this module borrows
from it.
"""

__version__ = "0.1.0"
__all__ = [
    "WorkerSpec", "WorkerState", "WorkerGroup", "Std", "DefaultLogsSpecs", "LocalElasticAgent", "RunResult",
    "ProcessFailure", "ChildFailedError", "ElasticError", "record", "ErrorHandler", "get_error_handler",
    "main", "parse_min_max_nnodes", "TORCHELASTIC_TIMER_FILE", "TORCHELASTIC_HEALTH_CHECK_PORT",
    "FileTimerServer", "FileTimerClient", "FileTimerRequest", "configure", "expires",
]

import io
import itertools
import logging
import os
import signal
import sys
import time

# Python 3.6 and 3.7 must reach this check, so this file (and every line above it) keeps to syntax
# 3.6 can parse: no walrus, no positional-only parameters, no f"{x=}".
if sys.version_info < (3, 8):
    _OLD = "elasticrun needs Python 3.8 or newer, this is Python %s" % sys.version.split()[0]
    if __name__ == "__main__":   # the launcher: one line and the status of a bad environment
        sys.stderr.write(_OLD + "\n")
        sys.exit(2)
    raise ImportError(_OLD)

try:  # vendored inside a package
    from . import rendezvous as _rdzv
    from . import store as _store
except ImportError:  # top-level modules
    try:
        import rendezvous as _rdzv
        import store as _store
    except ImportError:
        # run as a script under -I (or -P): python left this file's folder off sys.path. Look
        # there for the siblings, then give sys.path back as it was (workers inherit it).
        _HERE = os.path.dirname(os.path.abspath(__file__))
        sys.path.insert(0, _HERE)
        try:
            import rendezvous as _rdzv
            import store as _store
        finally:
            sys.path.remove(_HERE)

log = logging.getLogger(__name__)

_DEFAULT_PREFIX_TEMPLATE = "[${role_name}${local_rank}]:"
# the environment variables that turn on the file timer and the health check (torch's constants)
TORCHELASTIC_TIMER_FILE = "TORCHELASTIC_TIMER_FILE"
TORCHELASTIC_HEALTH_CHECK_PORT = "TORCHELASTIC_HEALTH_CHECK_PORT"


class ElasticError(Exception):
    """Root of this module's errors."""


def _signal_name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "signal %d" % signum


# --------------------------------------------------------------------------- States, streams, specs

class WorkerState:
    """Plain state names. A group goes INIT -> HEALTHY -> SUCCEEDED | FAILED | UNHEALTHY (restarting)
    and STOPPED when the agent tears it down itself."""
    UNKNOWN = "UNKNOWN"
    INIT = "INIT"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


class Std:
    """Which streams go to files (redirects) or to files and the console (tee): 0 none, 1 stdout,
    2 stderr, 3 both. A map ``"0:3,1:1"`` (local rank: value, any number of digits) is per rank."""
    NONE = 0
    OUT = 1
    ERR = 2
    ALL = 3

    @staticmethod
    def from_str(text):
        """``"3"`` -> 3; ``"0:3,12:1"`` -> {0: 3, 12: 1}. ValueError with a sentence otherwise."""
        text = str(text).strip()

        def value(v):
            if v not in ("0", "1", "2", "3"):
                raise ValueError("stream value %r is not one of 0, 1, 2, 3" % v)
            return int(v)

        if ":" not in text and "," not in text:
            return value(text)
        out = {}
        for part in text.split(","):
            rank, sep, v = part.strip().partition(":")
            if not sep or not rank.strip().isdigit():
                raise ValueError("%r is not a stream map such as 0:3,1:1" % text)
            out[int(rank)] = value(v.strip())
        return out


def _std_for(setting, local_rank):
    if isinstance(setting, dict):
        return setting.get(local_rank, Std.NONE)
    return int(setting or 0)


class DefaultLogsSpecs:
    """Where worker output goes. Files live in
    ``<log_dir>/<run_id>_<random>/attempt_<n>/<local_rank>/{stdout.log,stderr.log,error.json}``."""

    def __init__(self, log_dir=None, redirects=Std.NONE, tee=Std.NONE, local_ranks_filter=None,
                 ranks_filter=None):
        if isinstance(redirects, str):
            redirects = Std.from_str(redirects)
        if isinstance(tee, str):
            tee = Std.from_str(tee)
        self.log_dir = log_dir
        self.redirects = redirects
        self.tee = tee
        self.local_ranks_filter = set(local_ranks_filter) if local_ranks_filter is not None else None
        self.ranks_filter = set(ranks_filter) if ranks_filter is not None else None
        self.root_log_dir = None  # set per run by the agent
        self._own_dir = False

    def _make_root(self, run_id):
        import tempfile
        base = self.log_dir
        if base is None:
            base = tempfile.mkdtemp(prefix="torchelastic_")
            self._own_dir = True
        else:
            os.makedirs(base, exist_ok=True)
        self.root_log_dir = tempfile.mkdtemp(prefix="%s_" % _run_id_for_files(run_id), dir=base)
        return self.root_log_dir

    def _cleanup(self):
        """Drop a temp log dir we made ourselves when nothing in it was asked for (kept on failure:
        the report names its error files)."""
        if self._own_dir and not self.redirects and not self.tee and self.root_log_dir:
            import shutil
            shutil.rmtree(os.path.dirname(self.root_log_dir), ignore_errors=True)

    def streams(self, local_rank, global_rank):
        """(stdout, stderr) destinations: 'console', 'file' or 'tee'."""
        shown = ((self.local_ranks_filter is None or local_rank in self.local_ranks_filter)
                 and (self.ranks_filter is None or global_rank in self.ranks_filter))
        red = _std_for(self.redirects, local_rank)
        tee = _std_for(self.tee, local_rank)
        out = []
        for bit in (Std.OUT, Std.ERR):
            if tee & bit:
                dest = "tee"
            elif red & bit:
                dest = "file"
            else:
                dest = "console"
            if not shown and dest != "file":
                dest = "file"
            out.append(dest)
        return tuple(out)


def _run_id_for_files(run_id):
    """A run id as one file-name component: letters, digits, ``.``, ``_`` and ``-`` stay, every other
    byte of its UTF-8 is ``%XX`` (so ``../x`` and ``a/b`` stay inside the log folder); one longer than
    100 characters is cut and ends in a hash of the whole id, to stay well under NAME_MAX."""
    out = "".join(chr(b) if chr(b).isalnum() and b < 128 or chr(b) in "._-" else "%%%02X" % b
                  for b in run_id.encode("utf-8", "surrogateescape"))
    if len(out) > 100:
        import hashlib
        out = out[:83] + "~" + hashlib.sha256(run_id.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return out


def _with_local_rank(args, local_rank):
    """`args` with ``${local_rank}`` in each string replaced, for every kind of worker (torchrun's macro)."""
    return tuple(a.replace("${local_rank}", str(local_rank)) if isinstance(a, str) else a for a in args)


class WorkerSpec:
    """What to run on this node: `local_world_size` copies of `entrypoint` (a callable, or a program
    path run as a process with `args`). ``${local_rank}`` in string args is replaced per worker.
    Without `rdzv_handler` the node runs alone, and `local_addr` (default 127.0.0.1) is the workers'
    MASTER_ADDR; with one, the handler says where the job's nodes are.

    As torch's: `virtual_local_rank` gives every worker ``LOCAL_RANK=0`` and its own GPU as its only
    visible device; `numa_binding` (``node``, ``socket``, ``exclusive``, ``core-complex``) binds each
    worker to CPUs near its GPU (see _numa_plan); `duplicate_stdout_filters` /
    `duplicate_stderr_filters` copy the tee'd lines holding any of these strings to
    ``filtered_stdout.log`` / ``filtered_stderr.log`` in the attempt's log folder."""

    def __init__(self, role, local_world_size, entrypoint, args=(), rdzv_handler=None, max_restarts=3,
                 monitor_interval=0.1, master_addr=None, master_port=None, local_addr=None,
                 virtual_local_rank=False, numa_binding=None, duplicate_stdout_filters=None,
                 duplicate_stderr_filters=None):
        if int(local_world_size) < 1:
            raise ValueError("local_world_size must be at least 1, got %r" % (local_world_size,))
        if not (callable(entrypoint) or isinstance(entrypoint, str)):
            raise ValueError("entrypoint must be a callable or a program path, got %r" % (entrypoint,))
        if int(max_restarts) < 0:
            raise ValueError("max_restarts must be >= 0, got %r" % (max_restarts,))
        if float(monitor_interval) <= 0:
            raise ValueError("monitor_interval must be > 0, got %r" % (monitor_interval,))
        if numa_binding is not None and numa_binding not in _NUMA_MODES:
            raise ValueError("numa_binding must be one of %s, got %r"
                             % (", ".join(_NUMA_MODES), numa_binding))
        self.role = role
        self.local_world_size = int(local_world_size)
        self.entrypoint = entrypoint
        self.args = tuple(args)
        self.rdzv_handler = rdzv_handler
        self.max_restarts = int(max_restarts)
        self.monitor_interval = float(monitor_interval)
        self.master_addr = master_addr
        self.master_port = master_port
        self.local_addr = local_addr
        self.virtual_local_rank = bool(virtual_local_rank)
        self.numa_binding = numa_binding
        self.duplicate_stdout_filters = list(duplicate_stdout_filters or ())
        self.duplicate_stderr_filters = list(duplicate_stderr_filters or ())

    def get_entrypoint_name(self):
        if isinstance(self.entrypoint, str):
            return os.path.basename(self.entrypoint)
        return getattr(self.entrypoint, "__qualname__", repr(self.entrypoint))


class WorkerGroup:
    """A snapshot of a node's worker group, as torch's agent describes it (`get_worker_group()`)."""

    def __init__(self, spec, state, group_rank=None, group_world_size=None, master_addr=None,
                 master_port=None):
        self.spec, self.state = spec, state
        self.group_rank, self.group_world_size = group_rank, group_world_size
        self.master_addr, self.master_port = master_addr, master_port

    def __repr__(self):
        return "WorkerGroup(role=%r, state=%s, group_rank=%s, group_world_size=%s)" % (
            self.spec.role, self.state, self.group_rank, self.group_world_size)


class RunResult:
    """The whole outcome of `LocalElasticAgent.run`, and all the launcher reports from: the final
    state, return values keyed by global rank, every failure of the last attempt across the job
    (keyed by global rank), and the root cause among them. ``outlived_grace``: this node's workers of
    the last attempt that the agent stopped but had to SIGKILL after the grace period (not failures),
    each a ProcessFailure with its ``stack``."""

    def __init__(self, state, return_values=None, failures=None, root_cause=None, restart_count=0):
        self.state = state
        self.return_values = return_values or {}
        self.failures = failures or {}
        self.root_cause = root_cause      # (global_rank, ProcessFailure) of the whole job, or None
        self.outlived_grace = {}
        self.restart_count = restart_count   # restarts of the whole job (the most any node made)

    def is_failed(self):
        return self.state == WorkerState.FAILED

    def __repr__(self):
        return "RunResult(state=%s, return_values=%r, failures=%r)" % (
            self.state, self.return_values, self.failures)


# ------------------------------------------------------------------------------------ Error channel

def _error_payload(exc_type, exc, tb):
    import traceback
    return {"message": {
        "message": "%s: %s" % (exc_type.__name__, exc),
        "extraInfo": {"py_callstack": "".join(traceback.format_exception(exc_type, exc, tb)),
                      "timestamp": str(int(time.time()))},
    }}


def _write_json_atomic(path, data):
    import json
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _write_error_file(exc, path=None):
    path = path or os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        _write_json_atomic(path, _error_payload(type(exc), exc, exc.__traceback__))
    except OSError as e:
        log.warning("could not write the error file %s: %s", path, e)


class ErrorHandler:
    """torchelastic's error handler, for programs that report their own errors (``record`` is the
    usual way). ``initialize()`` turns on ``faulthandler`` for all threads, so a fatal signal
    prints Python stacks; ``record_exception(e)`` writes `e` to ``TORCHELASTIC_ERROR_FILE``
    (atomically; nothing when the variable is unset); ``dump_error_file(path, error_code)`` copies
    a child's error file into this process's own, setting ``errorCode`` inside its message. A
    subclass may override ``_get_error_file_path()`` to send errors elsewhere."""

    def __init__(self):
        self._fn_name = None

    def _get_error_file_path(self):
        return os.environ.get("TORCHELASTIC_ERROR_FILE")

    def set_entrypoint_fn_name(self, name):
        """Name the entrypoint in the log lines of record_exception and record_success."""
        self._fn_name = name

    def initialize(self):
        try:
            import faulthandler
            faulthandler.enable(all_threads=True)
        except Exception as e:   # stderr closed or not a real file: run on without it
            log.warning("could not enable faulthandler: %s: %s", type(e).__name__, e)

    def record_exception(self, e):
        if self._fn_name:
            log.debug("entrypoint %s failed: %s: %s", self._fn_name, type(e).__name__, e)
        path = self._get_error_file_path()
        if path:
            _write_error_file(e, path)

    def record_success(self):
        """A success leaves no error file; with an entrypoint name it is logged (debug)."""
        if self._fn_name:
            log.debug("entrypoint %s succeeded", self._fn_name)

    def override_error_code_in_rootcause_data(self, rootcause_error_file, rootcause_error, error_code=0):
        """Set ``errorCode`` in the message of `rootcause_error` (the JSON read from
        `rootcause_error_file`); a file whose message is a plain string is left as it is."""
        msg = rootcause_error.get("message") if isinstance(rootcause_error, dict) else None
        if isinstance(msg, dict):
            msg["errorCode"] = error_code
        else:
            log.warning("error file %s has no message object: errorCode %s not set",
                        rootcause_error_file, error_code)

    def dump_error_file(self, rootcause_error_file, error_code=0):
        """Copy the child's error file into ours, with `error_code` (the child's exit code, which a
        child killed by a signal could not write itself) when it is not 0."""
        import json
        with open(rootcause_error_file) as f:
            data = json.load(f)
        if error_code:
            self.override_error_code_in_rootcause_data(rootcause_error_file, data, error_code)
        path = self._get_error_file_path()
        if not path:
            log.error("no TORCHELASTIC_ERROR_FILE of our own to copy the child's error file %s into",
                      rootcause_error_file)
            return
        _write_json_atomic(path, data)


def get_error_handler():
    """A new ErrorHandler (torch's function of that name, a seam for a build to swap its own in)."""
    return ErrorHandler()


def record(fn=None):
    """Decorator: an exception escaping `fn` is written to ``TORCHELASTIC_ERROR_FILE`` (atomically,
    torchelastic's format) and re-raised. ``SystemExit`` is not an error: ``SystemExit(0)`` (a
    ``sys.exit(0)`` in a script run as a function, ``--run-path``) returns None, as torchelastic's
    does, and any other code passes through. As torchelastic's, it turns on ``faulthandler`` (all
    threads, to stderr) when `fn` is called, so a worker that dies of a fatal signal (SIGSEGV,
    SIGABRT, ...) prints its Python stacks."""
    import functools

    def wrap(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            try:
                import faulthandler
                faulthandler.enable(all_threads=True)
            except Exception as e:   # stderr closed or not a real file
                log.warning("could not enable faulthandler: %s", e)
            try:
                return f(*args, **kwargs)
            except SystemExit as e:
                if e.code == 0:
                    return None
                raise
            except ChildFailedError as e:
                _copy_root_cause(e, os.environ.get("TORCHELASTIC_ERROR_FILE"))
                raise
            except BaseException as e:
                _write_error_file(e)
                raise
        return wrapper

    return wrap(fn) if fn is not None else wrap


_ERROR_FILE_LIMIT = 1 << 20   # bytes of an error file the agent reads; a longer one: its tail


def _read_error_file(path):
    """(message, traceback, timestamp, raw) from an error file; Nones when missing or unreadable,
    ValueError when it is a file but not torchelastic's JSON (not JSON, or no ``message`` key).

    The worker controls that path, so it is opened without blocking (a FIFO would wait for a writer
    forever), read only when it is a regular file (/dev/zero never ends), and at most
    _ERROR_FILE_LIMIT bytes of it: a longer file gives the end of its traceback, not its JSON."""
    if not path:
        return None, None, None, None
    import json
    import stat
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None, None, None, None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            log.warning("ignoring the error file %s: not a regular file", path)
            return None, None, None, None
        if st.st_size > _ERROR_FILE_LIMIT:
            os.lseek(fd, st.st_size - _ERROR_FILE_LIMIT, os.SEEK_SET)
        raw = _read_at_most(fd, _ERROR_FILE_LIMIT + 1)
    except OSError:
        return None, None, None, None
    finally:
        os.close(fd)
    if st.st_size > _ERROR_FILE_LIMIT or len(raw) > _ERROR_FILE_LIMIT:
        tail = raw[-_ERROR_FILE_LIMIT:].decode("utf-8", "replace")
        if "\n" not in tail:
            tail = tail.replace("\\n", "\n").replace('\\"', '"')   # JSON-escaped text, readable
        return ("the error file has %d bytes, more than the %d KiB read: below is its end"
                % (max(st.st_size, len(raw)), _ERROR_FILE_LIMIT >> 10), tail, None, None)
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise ValueError("the error file %s is not JSON (%s)" % (path, e)) from None
    if not isinstance(data, dict) or "message" not in data:
        raise ValueError("the error file %s has no 'message' key: not torchelastic's format" % path)
    msg = data["message"]
    if isinstance(msg, dict):
        extra = msg.get("extraInfo") or {}
        ts = extra.get("timestamp")
        try:
            ts = int(ts) if ts is not None else None
        except (TypeError, ValueError):
            ts = None
        return msg.get("message"), extra.get("py_callstack"), ts, data
    if isinstance(msg, str):   # torchelastic's other layout: {"message": "...", "timestamp": 10}
        try:
            ts = int(data.get("timestamp"))
        except (TypeError, ValueError):
            ts = None
        return msg, None, ts, data
    return None, None, None, data


def _read_at_most(fd, limit):
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(fd, min(limit - size, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


_NOT_AVAILABLE = "<N/A>"   # torchelastic's word for a missing error file or signal


class ProcessFailure:
    """One failed worker: ranks, pid, exit code (negative: killed by that signal), its error file and
    what the file said. `timestamp` is the error file's (epoch seconds) or when the exit was seen.
    A worker that left no error file has ``error_file == "<N/A>"``, as in torchelastic. An error
    file that is there but not torchelastic's JSON raises ValueError, as torchelastic's does (the
    agent reports such a worker all the same, naming the file)."""

    def __init__(self, local_rank, pid, exitcode, error_file=None, message=None, timestamp=None,
                 rank=None, role="default", host=None, exit_time=None, traceback=None, stderr_log=None):
        self.local_rank = local_rank
        self.stderr_log = stderr_log     # the worker's stderr.log, when its stderr went to a file
        self.pid = pid
        self.exitcode = exitcode
        self.error_file = error_file if error_file and os.path.isfile(error_file) else _NOT_AVAILABLE
        self.rank = rank if rank is not None else local_rank
        self.role = role
        self.host = host or _hostname()
        self.exit_time = exit_time if exit_time is not None else time.time()
        file_msg, file_tb, file_ts, raw = _read_error_file(error_file)
        self.error_file_data = raw
        self.traceback = traceback if traceback is not None else file_tb
        if message is None:
            if file_msg:
                message = file_msg
            elif exitcode is not None and exitcode < 0:
                message = "Signal %d (%s) received by PID %s" % (-exitcode, _signal_name(-exitcode), pid)
            else:
                message = ("exited with code %s (no error file: see the worker's stderr)" % exitcode
                           if not error_file else _no_error_file(exitcode, os.path.dirname(error_file)))
        self.message = message
        if timestamp is None:
            timestamp = file_ts if file_ts is not None else int(self.exit_time)
        self.timestamp = timestamp
        self.stack = None   # faulthandler's dump, asked for just before the agent killed it

    def signal_name(self):
        """The signal that killed the worker (``"SIGSEGV"``), else ``"<N/A>"``."""
        return self._signal() or _NOT_AVAILABLE

    def _signal(self):
        return _signal_name(-self.exitcode) if self.exitcode is not None and self.exitcode < 0 else ""

    def launcher_exit_code(self):
        if self.exitcode is None:
            return 1
        return 128 - self.exitcode if self.exitcode < 0 else (self.exitcode or 1)

    def _to_dict(self):
        return {"local_rank": self.local_rank, "pid": self.pid, "exitcode": self.exitcode,
                "error_file": self.error_file, "message": self.message, "timestamp": self.timestamp,
                "rank": self.rank, "role": self.role, "host": self.host, "exit_time": self.exit_time,
                "traceback": self.traceback, "error_file_data": self.error_file_data, "stack": self.stack,
                "stderr_log": self.stderr_log}

    @classmethod
    def _from_dict(cls, d):
        f = cls(d["local_rank"], d["pid"], d["exitcode"], None, d["message"], d["timestamp"],
                d["rank"], d["role"], d["host"], d["exit_time"], d["traceback"])
        f.error_file = d.get("error_file") or _NOT_AVAILABLE
        f.error_file_data = d.get("error_file_data")
        f.stack = d.get("stack")
        f.stderr_log = d.get("stderr_log")
        return f

    def __repr__(self):
        return "ProcessFailure(rank=%s, local_rank=%s, pid=%s, exitcode=%s)" % (
            self.rank, self.local_rank, self.pid, self.exitcode)


def _worker_failure(local_rank, pid, exitcode, error_file, **kwargs):
    """The agent's ProcessFailure: an error file that is not torchelastic's JSON is named in the
    message, and never costs the report the worker's exit code."""
    try:
        return ProcessFailure(local_rank, pid, exitcode, error_file, **kwargs)
    except ValueError as e:
        f = ProcessFailure(local_rank, pid, exitcode, None, **kwargs)
        f.error_file = error_file
        if kwargs.get("message") is None and (exitcode is None or exitcode >= 0):
            f.message = "exited with code %s" % exitcode
        f.message = "%s; %s" % (f.message, e)
        return f


_FULL_BELOW = 64 * 1024   # bytes free under which a log folder's file system counts as full


def _no_error_file(exitcode, folder):
    """Why a failed worker left no error file, when its log folder tells: a full file system (its
    stderr and error file live there, so the worker could not say so itself)."""
    text = "exited with code %s (no error file: see the worker's stderr)" % exitcode
    try:
        st = os.statvfs(folder)
    except OSError:
        return text
    free = st.f_bavail * st.f_frsize
    if free < _FULL_BELOW or (st.f_files and not st.f_favail):
        return ("exited with code %s and left no error file: its log folder %s is on a full file system "
                "(ENOSPC: no space left on device; %d bytes free), so its stderr and error file there "
                "are cut short or empty" % (exitcode, folder, free))
    return text


def _first(failures):
    """(rank, failure) that came first: earliest exit, ties by global rank."""
    return min(failures.items(), key=lambda kv: (kv[1].exit_time, kv[0]))


class ChildFailedError(ElasticError):
    """Workers of `name` failed; `failures` maps global rank to ProcessFailure. `outlived_grace`:
    workers stopped by the agent that had to be SIGKILLed (shown apart, with their stacks)."""

    def __init__(self, name, failures, outlived_grace=None):
        if not failures:
            raise ValueError("ChildFailedError needs at least one failure")
        self.name = name
        self.failures = failures
        self.outlived_grace = outlived_grace or {}
        ElasticError.__init__(self, self.format_msg())

    def get_first_failure(self):
        return _first(self.failures)

    def format_msg(self):
        return _format_report(self.name, self.failures, self.outlived_grace)


def _fmt_time(t):
    return time.strftime("%Y-%m-%d_%H:%M:%S", time.localtime(t))


def _error_file_exists(f):
    """Whether the failure's error file was there: read on its own node (the data travels with the
    failure), or, on this node, found now."""
    if f.error_file_data is not None:
        return True
    return bool(f.error_file) and f.host == _hostname() and os.path.exists(f.error_file)


def _format_failure(rank, f):
    # torchelastic's labels and column (scripts match "exitcode  : -11 (pid: 997) (SIGSEGV)"),
    # with our own lines (role, stderr, message, stack) in the same column
    sig = " (%s)" % f._signal() if f._signal() else ""
    lines = [
        "  time      : %s" % _fmt_time(f.exit_time),
        "  host      : %s" % f.host,
        "  rank      : %s (local_rank: %s, role: %s)" % (rank, f.local_rank, f.role),
        "  exitcode  : %s (pid: %s)%s" % (f.exitcode, f.pid, sig),
        "  error_file: %s" % (f.error_file if _error_file_exists(f) else _NOT_AVAILABLE),
    ]
    if f.stderr_log:
        lines.append("  stderr    : %s" % f.stderr_log)
    lines.append("  message   : %s" % f.message)
    if f.traceback:
        lines.append("  traceback :")
        lines.extend("    " + line for line in f.traceback.rstrip("\n").split("\n"))
    if f.stack:
        lines.append("  stack     : (where it was when the agent killed it)")
        lines.extend("    " + line for line in f.stack.rstrip("\n").split("\n"))
    return lines


def _format_report(name, failures, outlived_grace=None, restarts=None, log_dir=None):
    """The failure report; `outlived_grace`: workers the agent stopped that were SIGKILLed after the
    grace period (not failures); `restarts` (job-wide count, budget) and this node's `log_dir` when
    known."""
    root_rank, root = _first(failures)
    bar = "=" * 72
    lines = [bar, "%s FAILED" % name]
    if restarts is not None:
        lines.append("restarts   : %d of %d (job-wide)" % restarts)
    if log_dir:
        lines.append("log folder : %s (on %s)" % (log_dir, _hostname()))
    lines += [bar, "Root cause (first failure):", "[rank %s]:" % root_rank]
    lines += _format_failure(root_rank, root)
    others = sorted((kv for kv in failures.items() if kv[0] != root_rank),
                    key=lambda kv: (kv[1].exit_time, kv[0]))
    if others:
        lines.append("Other failures:")
        for rank, f in others:
            lines.append("[rank %s]:" % rank)
            lines += _format_failure(rank, f)
    if outlived_grace:
        lines.append("Stopped by the agent, SIGKILLed after the grace period (not failures):")
        for rank, f in sorted(outlived_grace.items()):
            lines.append("[rank %s]:" % rank)
            lines += _format_failure(rank, f)
    lines.append(bar)
    return "\n".join(lines)


def _copy_root_cause(err, path):
    """Copy the root cause's error file into the launcher's own, with its exit code as errorCode:
    at the top level, and inside the message where torchelastic puts it (readers of torch's file
    look there). A root cause without an error file (killed by a signal, or a program that writes
    none) leaves the launcher's file unwritten, as torchelastic does."""
    if not path:
        return
    rank, f = err.get_first_failure()
    data = f.error_file_data if isinstance(f.error_file_data, dict) else None
    if data is None or not isinstance(data.get("message"), (dict, str)):
        log.info("rank %s failed without an error file: %s left unwritten (decorate the entrypoint "
                 "with @record for its traceback)", rank, path)
        return
    data = dict(data)
    if isinstance(data["message"], dict):
        data["message"] = dict(data["message"], errorCode=f.exitcode)
        if f.stack:
            extra = data["message"].get("extraInfo")
            data["message"]["extraInfo"] = dict(extra if isinstance(extra, dict) else {}, stack=f.stack)
    data["errorCode"] = f.exitcode
    try:
        _write_json_atomic(path, data)
    except OSError as e:
        log.warning("could not write the launcher's error file %s: %s", path, e)


_HOSTNAME = []


def _hostname():
    if not _HOSTNAME:
        import socket
        _HOSTNAME.append(socket.gethostname())
    return _HOSTNAME[0]


# --------------------------------------------------------------------------------- Process plumbing

def _prctl():
    """libc's prctl, or None off Linux. Resolved once in the agent so forked children only call it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None


_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(prctl, on=True):
    """Make this process the one its orphaned descendants are re-parented to (Linux 3.4+), so that
    they stay below it, where _descendants finds them."""
    if prctl is not None:
        prctl(_PR_SET_CHILD_SUBREAPER, 1 if on else 0)


def _die_with_parent(prctl, parent_pid):
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent_pid is not None and os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)


_REAPER_FDS = set()   # write ends of live reapers' pipes: a forked worker must not keep them open


class _Reaper:
    """A forked watchdog: the agent tells it (over a pipe) which worker process groups are live;
    when the pipe reaches end-of-file because the agent died, even by SIGKILL, it SIGKILLs them,
    then every process that carries the agent's `token` (see _marked_processes): a worker's
    descendant in a session of its own has no PR_SET_PDEATHSIG and is in no worker group. After
    ``close(clean=True)`` it leaves without a look: the agent's teardown has done that already."""

    def __init__(self, token=None):
        import warnings
        r, w = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # multi-threaded fork: child only uses os
            pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                self._serve(r, token)
            finally:
                os._exit(0)
        os.close(r)
        self.pid, self._w = pid, w
        _REAPER_FDS.add(w)

    @staticmethod
    def _serve(r, token):
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                  signal.SIGUSR2):
            signal.signal(s, signal.SIG_IGN)
        try:
            os.setsid()
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, r)
        os.closerange(r + 1, 65536)
        groups, buf, clean = set(), b"", False
        while True:
            try:
                chunk = os.read(r, 4096)
            except InterruptedError:
                continue
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line[:1] == b"+":
                    groups.add(int(line[1:]))
                elif line[:1] == b"-":
                    groups.discard(int(line[1:]))
                elif line == b".":
                    clean = True
        for pg in groups:
            try:
                os.killpg(pg, signal.SIGKILL)
            except OSError:
                pass
        if token is not None and not clean:
            _kill_marked(token)

    def _send(self, text):
        if self._w is not None:
            try:
                os.write(self._w, text.encode())
            except OSError:
                pass

    def watch(self, pgid):
        self._send("+%d\n" % pgid)

    def forget(self, pgid):
        self._send("-%d\n" % pgid)

    def close(self, clean=False):
        """Stop the watchdog; `clean` says every worker's tree is gone, so it need not look."""
        if clean:
            self._send(".\n")
        if self._w is not None:
            _REAPER_FDS.discard(self._w)
            os.close(self._w)
            self._w = None
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass


def _pidfd(pid):
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _proc_stat(pid):
    """(state, pgid) of a process from /proc/<pid>/stat (state b"Z" for a zombie), or None when it
    is gone or unreadable. The command name may hold spaces and parentheses: split after the last ")"."""
    try:
        with open("/proc/%s/stat" % pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0], int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid):
    """True while `pid` runs. A zombie still answers kill(0), but it is dead for us."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _proc_stat(pid)
    return stat is None or stat[0] != b"Z"


def _process_table():
    """{pid: (state, ppid, pgid)} of every process /proc shows, read once."""
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            table[int(name)] = (fields[0], int(fields[1]), int(fields[2]))
        except (OSError, IndexError, ValueError):
            pass
    return table


def _descendants(root, skip=()):
    """{pid: pgid} of the live processes below `root` (zombies aside), never `root` itself nor the
    pids in `skip` (what is below those still counts). Under a subreaper (_set_subreaper) that is
    every process it or its children started that is still alive, orphans included."""
    children = {}
    table = _process_table()
    for pid, (_, ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        state, _, pgid = table[pid]
        if pid not in skip and state != b"Z":
            found[pid] = pgid
    return found


def _kill_descendants(root, skip=(), timeout=2.0):
    """SIGKILL every process below `root` (see _descendants), again until none is left: one may fork
    between our look and its death. Gives up after `timeout` seconds."""
    deadline, killed = time.monotonic() + timeout, set()
    while True:
        pids = _descendants(root, skip)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except OSError:
                pass
        if not pids or time.monotonic() >= deadline:
            break
        time.sleep(0.005)   # SIGKILL takes effect when the process is next scheduled
    for pid in killed:   # the adopted ones are our children now: leave no zombies behind
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _group_alive(pgid):
    """True while a process of the group is still running. Zombies don't count: where PID 1 does
    not reap orphans (some containers), a dead grandchild would otherwise hold every teardown for
    its whole grace period."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        names = os.listdir("/proc")
    except OSError:
        return True
    for name in names:
        stat = _proc_stat(name) if name.isdigit() else None
        if stat is not None and stat[1] == pgid and stat[0] != b"Z":
            return True
    return False


# A worker's descendant can leave the worker's process group (``setsid cmd &``, a daemon, Popen with
# start_new_session=True), and then no group signal reaches it. What it keeps is its environment:
# each worker gets ELASTICRUN_TREE holding a token unique to this agent's run, every program it
# starts inherits it, and teardown finds them all in /proc/<pid>/environ (Jenkins' ProcessTreeKiller
# works the same way). It needs no privileges and sees only our own user's processes. The value is
# a colon-separated list: a launcher run by another launcher's worker passes on the outer tokens too,
# so the outer teardown still finds the inner workers.
_TREE_VAR = "ELASTICRUN_TREE"


def _new_tree_token():
    """A token no other agent on this machine holds: pids get reused, so random bits come along."""
    return "%d-%s" % (os.getpid(), os.urandom(6).hex())


def _tree_mark(token, inherited):
    """ELASTICRUN_TREE for a worker: the marks the launcher inherited, then this agent's token."""
    return "%s:%s" % (inherited, token) if inherited else token


def _carries_mark(environ, token):
    """True when an environment block (NUL-separated, as in /proc) has `token` in ELASTICRUN_TREE."""
    if token not in environ:   # the cheap test first: almost every process fails it
        return False
    prefix = _TREE_VAR.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return token in entry[len(prefix):].split(b":")
    return False


def _marked_processes(token):
    """{pid: pgid} of the live processes (zombies aside) that carry this agent's `token`, never our
    own. /proc/<pid>/environ is the environment a process was exec'd with: what a program started
    by a worker inherits, but not what a worker forked without exec shows (that is the launcher's);
    such a worker is reached through its group instead. Reads every process's environment once,
    so call it at teardown, never in a polling loop."""
    needle, me, found = token.encode(), os.getpid(), {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open("/proc/%s/environ" % name, "rb") as f:
                if not _carries_mark(f.read(), needle):
                    continue
        except OSError:   # another user's, or gone meanwhile
            continue
        stat = _proc_stat(name)
        if stat is not None and stat[0] != b"Z":
            found[int(name)] = stat[1]
    return found


def _signal_marked(token, sig, skip_groups=()):
    """Send `sig` to the processes that carry `token`, except members of `skip_groups` (those had
    the group's signal: a second SIGINT would cut a graceful shutdown short). Returns their pids."""
    sent = []
    for pid, pgid in _marked_processes(token).items():
        if pgid in skip_groups:
            continue
        try:
            os.kill(pid, sig)
            sent.append(pid)
        except OSError:
            pass
    return sent


def _kill_marked(token, timeout=2.0):
    """SIGKILL every process that carries `token`, again until none is left: one may fork between
    our look and its death, and its child carries the token too. Gives up after `timeout` seconds
    (a process in uninterruptible sleep dies only when its I/O ends)."""
    deadline = time.monotonic() + timeout
    while _signal_marked(token, signal.SIGKILL) and time.monotonic() < deadline:
        time.sleep(0.005)   # SIGKILL takes effect when the process is next scheduled


# ----------------------------------------------------------------------------------- Python workers

_BOOTSTRAP = r'''
import sys
def _b():
    import os, sys
    def hook(t, v, tb, prev=sys.excepthook):
        try:
            path = os.environ.get("TORCHELASTIC_ERROR_FILE")
            if path and not os.path.exists(path):
                import json, time, traceback
                user_tb = tb
                while user_tb is not None and user_tb.tb_frame.f_code.co_filename == "<string>":
                    user_tb = user_tb.tb_next
                data = {"message": {"message": "%s: %s" % (t.__name__, v), "extraInfo": {
                    "py_callstack": "".join(traceback.format_exception(t, v, user_tb)),
                    "timestamp": str(int(time.time()))}}}
                tmp = "%s.%d.tmp" % (path, os.getpid())
                with open(tmp, "w") as f:
                    json.dump(data, f)
                os.replace(tmp, path)
        except Exception:
            pass
        while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":
            tb = tb.tb_next  # our own bootstrap frames
        end()
        prev(t, v.with_traceback(tb) if tb is not None else v, tb)
    sys.excepthook = hook
    path, sig = os.environ.get("ELASTICRUN_STACK_FILE"), os.environ.get("ELASTICRUN_STACK_SIGNAL")
    if path and sig:   # elastic._arm_stack_dump
        try:
            import faulthandler
            f = open(path + ".tmp", "w")
            faulthandler.register(int(sig), file=f, all_threads=True, chain=False)
            os.replace(path + ".tmp", path)
        except Exception:
            pass
    import atexit, io
    class Raw(io.FileIO):   # elastic._LastByte
        def write(self, b):
            n = io.FileIO.write(self, b)
            if n:
                try:
                    self.last[0] = b[n - 1]
                except (IndexError, TypeError, NotImplementedError):   # items wider than a byte
                    self.last[0] = memoryview(b).cast("B")[n - 1]
            return n
    ours, lasts = [], {}
    for name, fd in (("stdout", 1), ("stderr", 2)):   # elastic._whole_line_stdio
        old = getattr(sys, name)
        if old is not None:
            raw = Raw(fd, "w", closefd=False)
            st = os.fstat(fd)
            raw.last = lasts.setdefault((st.st_dev, st.st_ino), [10])
            new = io.TextIOWrapper(io.BufferedWriter(raw), encoding=old.encoding, errors=old.errors,
                                   line_buffering=True)
            setattr(sys, name, new)
            setattr(sys, "__%s__" % name, new)
            ours.append((new, raw))
    def end():   # elastic._end_stdio_lines
        for new, raw in ours:
            try:
                new.flush()
            except Exception:
                pass
        for new, raw in ours:
            if raw.last[0] != 10:
                raw.last[0] = 10
                try:
                    os.write(raw.fileno(), b"\n")
                except Exception:
                    pass
    atexit.register(end)   # the first registered runs last
    mode = "-m" if sys.argv[1] == "-m" else "-s"
    del sys.argv[:2 if mode == "-m" else 1]
    target = sys.argv[0]
    g = globals()
    del g["_b"], g["sys"]
    if mode == "-m":
        import runpy
        sys.path[0] = os.getcwd()
        return compile("__import__('runpy')._run_module_as_main(%r)" % target, "<elasticrun>", "exec")
    source = b"\0" if os.path.isdir(target) else open(target, "rb").read()
    if b"\0" in source:   # a directory or a zipapp: run its __main__, as python does
        sys.path[0] = target
        return compile("__import__('runpy')._run_module_as_main('__main__', False)", "<elasticrun>", "exec")
    sys.path[0] = os.path.dirname(os.path.realpath(target))
    import importlib.machinery
    g["__file__"] = target
    g["__loader__"] = importlib.machinery.SourceFileLoader("__main__", target)
    return compile(source, target, "exec")
exec(_b())
'''

# What a worker's command line carries instead of the bootstrap itself, so that ``ps`` shows
# ``python -u -c <this> train.py --lr 0.1`` and ``pkill -f train.py`` finds it. The bootstrap comes
# in the environment and is taken out of it at once (the script's children never see it).
_BOOT_ENV = "ELASTICRUN_BOOT"
_BOOT_STUB = "exec(__import__('os').environ.pop(%r))" % _BOOT_ENV


def python_command(script, args=(), module=False):
    """argv that runs a Python script (or ``-m`` module) the way ``python -u`` does, with an excepthook
    that records an uncaught exception in ``TORCHELASTIC_ERROR_FILE``. The bootstrap itself travels
    in the environment: the agent adds it for a WorkerSpec with this entrypoint; to run the argv
    yourself, give it ``python_environment()``."""
    return [sys.executable, "-u", "-c", _BOOT_STUB] + (["-m"] if module else []) + [script] + list(args)


def python_environment(env=None):
    """`env` (default: this process's) plus what a ``python_command`` argv needs."""
    env = dict(os.environ if env is None else env)
    env[_BOOT_ENV] = _BOOTSTRAP
    return env


class _ForkServer:
    """A copy of the launcher, forked before it starts anything, that forks Python-script workers on
    request. A worker so made starts in about a millisecond instead of paying for a new interpreter
    (site, imports) at every launch and restart; it runs the script in a fresh ``__main__`` module,
    line-buffered, with the same excepthook as the bootstrap. Opt-in (``ELASTICRUN_FORKSERVER=1``),
    because a forked worker is not what torchrun starts, and cannot be made so without privileges:
    it keeps the launcher's command line (``ps`` and ``pkill -f train.py`` do not see the script),
    its interpreter flags (``python3 -I -S elasticrun.pyz`` gives workers no site-packages), str
    hash seed and ``sys.path``, and the standard-library modules it had imported (a script-local
    ``json.py`` will not shadow ``json``; our own ``store``, ``rendezvous`` and ``elastic`` are
    dropped from ``sys.modules``, so those names stay free).

    The server is a child of the agent and leaves when the agent's end of the socket closes, killing
    every process below it first (it is their subreaper: orphans of its workers stay below it);
    workers are its children (PR_SET_PDEATHSIG). A SIGKILLed agent takes all of them along. Over a
    socketpair::

        agent -> server   frame: u32 length, u8 flags (1: stdout fd, 2: stderr fd; the fds ride along
                          as SCM_RIGHTS), then NUL-separated: mode, script, argc, args..., KEY=VALUE...
        server -> agent   "P <pid>\\n" after each fork;  "X <pid> <exitcode>\\n" when it is reaped
    """

    def __init__(self):
        import socket
        ours, theirs = socket.socketpair()
        agent = os.getpid()
        pid = os.fork()
        if pid == 0:
            ours.close()
            # ctypes is imported here, in the server, so the agent's memory never holds it
            self.worker_request = _fork_server_loop(theirs, _prctl(), agent)  # returns in workers only
            return
        theirs.close()
        self.pid, self.sock, self.worker_request = pid, ours, None
        self._buf, self._forked, self.exits = b"", [], {}
        self._pids, self._asked, self._dead = [], 0, False

    def request(self, mode, script, args, env, out_fd=None, err_fd=None):
        """Ask for a worker; the fds are duplicated in flight (close yours when this returns).
        Requests are answered in order: take each pid with next_pid()."""
        import array
        import socket
        import struct
        fields = [mode, script, str(len(args))] + list(args) + ["%s=%s" % kv for kv in env.items()]
        body = b"\0".join(f.encode("utf-8", "surrogateescape") for f in fields)
        fds = [fd for fd in (out_fd, err_fd) if fd is not None]
        flags = (1 if out_fd is not None else 0) | (2 if err_fd is not None else 0)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        if self._dead:
            raise ElasticError("the worker fork server died")
        self._asked += 1
        self._send(struct.pack("!IB", len(body), flags) + body, ancillary)

    def _send(self, data, ancillary):
        """Send all of `data` (the fds ride with its first byte), taking in the server's replies
        whenever it cannot go out: a server blocked on replies we do not read stops reading
        requests, and with both socket buffers full neither side would move again."""
        import select
        import socket
        view = memoryview(data)
        while view:
            readable, writable = select.select([self.sock], [self.sock], [])[:2]
            if readable:
                self.read(0)
            if writable:
                try:
                    sent = self.sock.sendmsg([view], ancillary, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    continue
                view, ancillary = view[sent:], []

    def next_pid(self):
        while not self._forked:
            self.read(None)
        return self._forked.pop(0)

    def read(self, timeout=0.0):
        """Take in what the server said; waits up to `timeout` (None: until something arrives)."""
        import select
        if timeout is None or timeout > 0:
            if not select.select([self.sock], [], [], timeout)[0]:
                return
        else:
            if not select.select([self.sock], [], [], 0)[0]:
                return
        data = self.sock.recv(65536)
        if not data:
            # its workers died with it (PR_SET_PDEATHSIG): report them killed, never hang on them
            if self.sock is not None and not self._dead:
                log.error("the worker fork server (pid %d) died", self.pid)
            self._dead = True
            for pid in self._pids:
                self.exits.setdefault(pid, -signal.SIGKILL)
            if self._asked > len(self._pids):
                raise ElasticError("the worker fork server died")
            return
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            parts = line.split()
            if parts[0] == b"P":
                self._forked.append(int(parts[1]))
                self._pids.append(int(parts[1]))
            elif parts[0] == b"X":
                self.exits[int(parts[1])] = int(parts[2])

    def close(self, wait=True):
        """Stop the server (it leaves when its socket closes); `wait` reaps it."""
        if self.worker_request is None and self.sock is not None:
            self.sock.close()
            self.sock = None
            if wait:
                try:
                    os.waitpid(self.pid, 0)
                except ChildProcessError:
                    pass


def _fork_server_loop(sock, prctl, agent_pid):
    """The server's life: fork on request, report births and deaths. Returns only in a new worker."""
    try:
        os.setsid()
    except OSError:
        pass
    # The server adopts every orphan below its workers (a worker's child that forked again and
    # called setsid is in no worker group and carries no mark), so teardown finds them among its
    # descendants. It has no PR_SET_PDEATHSIG: it leaves when its socket reaches end-of-file, as it
    # does when the agent dies, and kills what is below it first.
    _set_subreaper(prctl)
    if os.getppid() != agent_pid:   # the agent died before we got here
        os._exit(1)
    me = os.getpid()
    try:
        request = _fork_server_serve(sock, prctl)
        if request is not None:   # in a new worker
            return request
    except BaseException:
        if os.getpid() != me:   # a new worker failed before running its script
            raise
    _kill_descendants(me)
    os._exit(0)


def _fork_server_serve(sock, prctl):
    """The server's loop; returns None when the agent has gone, the request in a new worker."""
    import array
    import select
    import socket
    import struct
    import gc
    gc.freeze()  # workers' collections skip what they inherit: fewer copy-on-write page copies
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    for s in handled:
        signal.signal(s, signal.SIG_IGN)
    # Also blocked: a child inherits "ignored" until it resets its handlers, and the agent may signal
    # it as soon as it has its pid; blocked, such a signal stays pending until the child unblocks.
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    me = os.getpid()
    int_size = array.array("i").itemsize
    while True:
        ready = select.select([sock, wake_r], [], [])[0]
        if wake_r in ready:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            sock.sendall(b"X %d %d\n" % (pid, code))
        if sock not in ready:
            continue
        head, anc, _, _ = sock.recvmsg(5, socket.CMSG_SPACE(2 * int_size))
        if not head:
            return None
        fds = array.array("i")
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - (len(data) % int_size)])
        try:
            head += _store._recv_exactly(sock, 5 - len(head))
            size, flags = struct.unpack("!IB", head)
            body = _store._recv_exactly(sock, size)
        except EOFError:   # the agent is gone mid-request
            return None
        fields = [f.decode("utf-8", "surrogateescape") for f in body.split(b"\0")]
        mode, script, argc = fields[0], fields[1], int(fields[2])
        args, env = fields[3:3 + argc], dict(f.split("=", 1) for f in fields[3 + argc:])
        fds = list(fds)
        pid = os.fork()
        if pid == 0:
            sock.close()
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for s in handled:
                signal.signal(s, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)   # a stop sent meanwhile lands now
            os.setsid()
            _die_with_parent(prctl, me)
            targets = [t for t, bit in ((1, 1), (2, 2)) if flags & bit]
            for fd, target in zip(fds, targets):
                os.dup2(fd, target)
                os.close(fd)
            return mode, script, args, env
        for fd in fds:
            os.close(fd)
        sock.sendall(b"P %d\n" % pid)


def _run_forked_worker(request):
    """In a worker forked by the server: become ``python -u SCRIPT ARGS`` (or ``-m``) and exit the way
    the interpreter would (non-daemon threads joined, atexit run, streams flushed, exit status from
    SystemExit or 1 after an uncaught exception, the script's objects finalized), minus tearing
    down the launcher's modules."""
    code = 0
    try:
        _exec_script(request)
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code = -signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        sys.stderr.write("%s\n" % (code,))
        code = 1
    _exit_handlers(_finalize_script)
    if code == -signal.SIGINT:  # as CPython does: die by the signal
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def _exit_handlers(then=None, run_atexit=True):
    """What the interpreter does at exit before it finalizes itself: join non-daemon threads, run
    the atexit handlers (unless they are a forking parent's), then `then()`, and flush stdio. A
    worker calls this, then os._exit."""
    try:
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()
        if run_atexit:
            import atexit
            atexit._run_exitfuncs()
        if then is not None:
            then()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except BaseException:
        pass
    _end_stdio_lines()


def _finalize_script():
    """Free the script's globals as interpreter shutdown does, so that its objects are finalized:
    a file it never closed gets its buffer written, ``__del__`` methods run.

    Like CPython's module clearing: names with one leading underscore first, then the rest, each
    set to None so that every object is released by reference count, in a safe order (a garbage
    collection of the module's cycles could close a file's descriptor before writing its buffer).
    Modules the script imported are left alone, as CPython leaves most of them to its collector.
    """
    import gc
    sys.excepthook = sys.__excepthook__     # ours holds the script's globals
    main = sys.modules.pop("__main__", None)
    namespace = getattr(main, "__dict__", {})
    del main
    for private in (True, False):
        for name in list(namespace):
            if (name.startswith("_") and not name.startswith("__")) == private and name != "__builtins__":
                namespace[name] = None
    gc.collect()


class _LastByte(io.FileIO):
    """A stdio descriptor that remembers the last byte written through it, in ``last[0]`` (a list
    shared by stdout and stderr when both are the same file), so that the worker can end its last
    line as it exits: a pipe or a terminal cannot be read back. One Python call per line written
    (the text stream above it is line buffered), next to the system call that writes it."""

    def write(self, b):
        n = io.FileIO.write(self, b)
        if n:
            try:
                self.last[0] = b[n - 1]
            except (IndexError, TypeError, NotImplementedError):   # items wider than a byte
                self.last[0] = memoryview(b).cast("B")[n - 1]
        return n


_STDIO = []   # in a Python worker: (text stream, its _LastByte) for stdout and stderr


def _whole_line_stdio():
    """sys.stdout and sys.stderr line buffered: one write per whole line, so ranks sharing a console
    never split each other's lines (``python -u`` writes a print's text and its newline apart, a
    block-buffered stream cuts lines at 8 KiB); flush() works as usual. Their last bytes are
    tracked for _end_stdio_lines. Every kind of Python worker calls this (the bootstrap carries its
    own copy: it runs where this module may not import)."""
    lasts = {}
    for name, fd in (("stdout", 1), ("stderr", 2)):
        old = getattr(sys, name)
        if old is None:
            continue
        old.flush()
        raw = _LastByte(fd, "w", closefd=False)
        st = os.fstat(fd)
        raw.last = lasts.setdefault((st.st_dev, st.st_ino), [10])
        new = io.TextIOWrapper(io.BufferedWriter(raw), encoding=old.encoding, errors=old.errors,
                               line_buffering=True)
        setattr(sys, name, new)
        setattr(sys, "__%s__" % name, new)
        _STDIO.append((new, raw))


def _end_stdio_lines():
    """End the line a worker's stdout or stderr left unterminated, so that what follows on the same
    console (the launcher's next line, a traceback) starts on a line of its own. A worker calls
    this as it exits and before its traceback is printed; a worker that ended its lines writes
    nothing."""
    for stream, raw in _STDIO:
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    for stream, raw in _STDIO:
        if raw.last[0] != 10:
            raw.last[0] = 10
            try:
                os.write(raw.fileno(), b"\n")
            except (OSError, ValueError):
                pass


def _arm_stack_dump():
    """Arm faulthandler (every thread) on the launcher's stack signal, writing to the worker's own
    stack file; both come in ELASTICRUN_STACK_SIGNAL and ELASTICRUN_STACK_FILE. The file appears
    under its name only once the handler is in place: the agent signals a worker only then (the
    signal's default action would end it). The bootstrap carries its own copy."""
    path, sig = os.environ.get(_STACK_FILE_VAR), os.environ.get(_STACK_SIGNAL_VAR)
    if not path or not sig:
        return
    try:
        import faulthandler
        f = open(path + ".tmp", "w")
        faulthandler.register(int(sig), file=f, all_threads=True, chain=False)
        os.replace(path + ".tmp", path)
    except (OSError, ValueError, RuntimeError) as e:
        sys.stderr.write("elasticrun: no stack dumps for this worker: %s\n" % e)


def _exec_script(request):
    import types
    mode, script, args, env = request
    os.environ.update(env)
    _take_cpu_binding(os.environ)
    _arm_stack_dump()
    _whole_line_stdio()
    # the launcher's own modules must not answer the script's `import store` (or rendezvous,
    # elastic): the script's directory may hold modules of those names
    for name in {__name__, "elastic", _store.__name__, _rdzv.__name__}:
        sys.modules.pop(name, None)
    import builtins
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module
    sys.excepthook = _worker_excepthook(module.__dict__)
    sys.argv = [script] + list(args)
    if mode == "-m":
        import runpy
        sys.path[0] = os.getcwd()
        runpy._run_module_as_main(script)
        return
    if os.path.isdir(script):
        source = b"\0"
    else:
        with open(script, "rb") as f:
            source = f.read()
    if b"\0" in source:   # a directory or a zipapp (no script has a NUL byte): run its __main__, as python does
        import runpy
        sys.path[0] = script
        runpy._run_module_as_main("__main__", alter_argv=False)
        return
    sys.path[0] = os.path.dirname(os.path.realpath(script))   # a symlink's target folder, as python does
    code = compile(source, script, "exec")
    import importlib.machinery
    module.__file__ = script
    module.__spec__ = None
    module.__loader__ = importlib.machinery.SourceFileLoader("__main__", script)
    exec(code, module.__dict__)


def _worker_excepthook(main_globals):
    """Record an uncaught exception in TORCHELASTIC_ERROR_FILE (unless @record did), then print it;
    tracebacks start at the script's own module frame."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        start = tb
        while start is not None and start.tb_frame.f_globals is not main_globals:
            start = start.tb_next
        tb = start or tb
        try:
            path = os.environ.get("TORCHELASTIC_ERROR_FILE")
            if path and not os.path.exists(path):
                _write_json_atomic(path, _error_payload(kind, value, tb))
        except Exception:
            pass
        _end_stdio_lines()
        # the default hook prints the exception's own __traceback__, not the one it is given
        previous(kind, value.with_traceback(tb) if tb is not None else value, tb)

    return hook


def _function_worker(fn, args, env, conn, out_path, err_path, parent_pid, forked=False):
    """Body of a callable worker (a multiprocessing child; `forked`: by the fork start method, so
    the atexit handlers it holds are the agent's, not its own)."""
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):  # forked children inherit the launcher's
        signal.signal(s, signal.SIG_DFL)
    for s in signal.valid_signals():   # and its forwarding and stack-signal handlers
        if isinstance(getattr(signal.getsignal(s), "__self__", None), _StopFlag):
            signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for fd in list(_REAPER_FDS):  # inherited through fork: the reaper must see EOF when the agent dies
        try:
            os.close(fd)
        except OSError:
            pass
    _REAPER_FDS.clear()
    try:
        os.setsid()
    except OSError:
        pass
    _die_with_parent(_prctl(), parent_pid)
    os.environ.update(env)
    _take_cpu_binding(os.environ)
    _arm_stack_dump()
    for path, fd in ((out_path, 1), (err_path, 2)):
        if path:
            sys.stdout.flush() if fd == 1 else sys.stderr.flush()
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(f, fd)
            os.close(f)
    _whole_line_stdio()
    try:
        ret = fn(*args)
    except SystemExit:
        _end_stdio_lines()   # multiprocessing prints its message, then leaves without our exit path
        raise
    except BaseException as e:
        _write_error_file(e, env.get("TORCHELASTIC_ERROR_FILE"))
        _end_stdio_lines()   # and the traceback
        raise
    conn.send(ret)
    # Stay until the agent says every worker of the group has returned, as torch's workers do:
    # a value pickled by reference (torch tensors: shared memory whose descriptor this process
    # hands out) can only be read while we live, and no rank leaves while its peers still run.
    try:
        conn.recv_bytes()
    except (EOFError, OSError):
        pass   # the agent is gone: nothing left to wait for
    conn.close()
    # Leave without finalizing the interpreter (as a forked multiprocessing child always does, but
    # with the atexit handlers run): torch's gloo threads may still be releasing the last
    # collective's tensors, which takes the GIL, and a thread that takes it while the interpreter
    # finalizes aborts the process ("terminate called without an active exception", SIGABRT).
    _exit_handlers(run_atexit=not forked)
    os._exit(0)


# --------------------------------------------------------------------------------- Worker processes
#
# Three kinds of worker process, one handle interface (_Handle): ``pid`` (also its process group:
# every worker leads its own session), ``wait_fd`` (readable when it may have exited; None: poll it),
# ``poll()`` (exit code once reaped, negative for a signal, else None), ``wait()``, ``signal(sig)``
# (to its group), ``close()``; and for a callable's return value ``result_fd``, ``take_result()``
# and ``result``.

def _signal_group(pid, sig):
    """`sig` to the process group `pid` leads, or to `pid` alone before it has called setsid."""
    try:
        os.killpg(pid, sig)
        return
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.kill(pid, sig)
    except OSError:
        pass


class _Handle:
    """What every kind shares: the group signal, and no return value to collect."""
    pid = wait_fd = result_fd = result = result_error = None
    has_result = False

    def signal(self, sig):
        _signal_group(self.pid, sig)

    def take_result(self, block):
        pass

    def release(self):
        pass

    def close(self):
        pass


class _ProgramHandle(_Handle):
    """A program run as a subprocess (``--no-python``, ``WorkerSpec(entrypoint="path")``)."""

    def __init__(self, popen):
        self._popen, self.pid = popen, popen.pid
        self.wait_fd = _pidfd(self.pid)   # None before Linux 5.3: polled instead

    def poll(self):
        return self._popen.poll()

    def wait(self):
        return self._popen.wait()

    def close(self):
        if self.wait_fd is not None:
            os.close(self.wait_fd)
            self.wait_fd = None


class _ChildHandle(_Handle):
    """A callable run in a multiprocessing child; its return value comes back over a pipe, and the
    child waits on that pipe after sending it until ``release()`` (see _function_worker)."""

    def __init__(self, process, conn):
        self._process, self._conn, self.pid = process, conn, process.pid
        self.wait_fd = process.sentinel

    @property
    def result_fd(self):
        return None if self.has_result else self._conn.fileno()

    def poll(self):
        return self._process.exitcode

    def wait(self):
        self._process.join()
        return self._process.exitcode

    def take_result(self, block):
        """Read the return value if it is there (or, `block`ing, once the child has exited). A value
        that arrives but cannot be unpickled is kept in ``result_error``: a failure, never a None."""
        if self.has_result:
            return
        try:
            if block or self._conn.poll():
                self.has_result = True
                self.result = self._conn.recv()
        except (EOFError, ConnectionResetError):
            pass   # the child exited without sending (SystemExit, or it failed): no value
        except Exception as e:
            self.result_error = "its return value could not be read: %s: %s" % (type(e).__name__, e)

    def release(self):
        """Let a child that has sent its value exit."""
        try:
            self._conn.send_bytes(b"go")
        except OSError:
            pass   # it is gone already

    def close(self):
        self._process.join(0)
        self._conn.close()


class _ForkedHandle(_Handle):
    """A Python-script worker the fork server made: its exit arrives as a line on the server's socket."""

    def __init__(self, server, pid):
        self._server, self.pid = server, pid
        self.wait_fd = server.sock.fileno()

    def poll(self):
        self._server.read(0)
        return self._server.exits.get(self.pid)

    def wait(self):
        while self.pid not in self._server.exits:
            self._server.read(None)
        return self._server.exits[self.pid]


# Where a worker runs: torch's virtual local rank and NUMA binding, on what sysfs and nvidia-smi say.

_NUMA_MODES = ("node", "socket", "exclusive", "core-complex")


def _virtual_local_rank_env(local_rank, environ):
    """LOCAL_RANK 0 and the worker's GPU (the local_rank-th visible one) as its only device."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return {"LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": str(local_rank)}
    devices = visible.split(",")
    if local_rank >= len(devices):
        raise ValueError("local rank %d has no GPU in CUDA_VISIBLE_DEVICES=%s" % (local_rank, visible))
    return {"LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": devices[local_rank].strip()}


def _cpu_list(text):
    """The CPUs of a sysfs list such as ``0-3,8,10-11``."""
    cpus = set()
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


class _CpuTopology:
    """The CPUs this process may run on, as sysfs groups them: by NUMA node, package (socket),
    physical core and last-level cache. `root` and `allowed` are seams for tests."""

    def __init__(self, root="/sys/devices/system", allowed=None):
        self.allowed = set(os.sched_getaffinity(0) if allowed is None else allowed)
        self.nodes = {}                     # NUMA node -> sorted allowed CPUs
        node_dir = os.path.join(root, "node")
        for name in sorted(os.listdir(node_dir)) if os.path.isdir(node_dir) else ():
            if name.startswith("node") and name[4:].isdigit():
                cpus = sorted(_cpu_list(self._read(os.path.join(node_dir, name, "cpulist"))) & self.allowed)
                if cpus:
                    self.nodes[int(name[4:])] = cpus
        if not self.nodes:                  # no NUMA in sysfs: one node of every allowed CPU
            self.nodes[0] = sorted(self.allowed)
        cpu_dir = os.path.join(root, "cpu")
        self.package, self.core, self.cache = {}, {}, {}
        for cpu in self.allowed:
            top = os.path.join(cpu_dir, "cpu%d" % cpu, "topology")
            self.package[cpu] = self._read(os.path.join(top, "physical_package_id")) or "0"
            self.core[cpu] = self._read(os.path.join(top, "thread_siblings_list")) or str(cpu)
            cache = self._last_level_cache(os.path.join(cpu_dir, "cpu%d" % cpu, "cache"))
            self.cache[cpu] = cache or str(cpu)

    @staticmethod
    def _read(path):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return ""

    def _last_level_cache(self, cache_dir):
        """The CPU list sharing this CPU's highest-level cache (L3 on most machines)."""
        best = (0, "")
        for name in os.listdir(cache_dir) if os.path.isdir(cache_dir) else ():
            level = self._read(os.path.join(cache_dir, name, "level"))
            if name.startswith("index") and level.isdigit() and int(level) > best[0]:
                best = (int(level), self._read(os.path.join(cache_dir, name, "shared_cpu_list")))
        return best[1]


def _gpu_numa_nodes(environ):
    """The NUMA node of each GPU a worker sees, in device order (CUDA_VISIBLE_DEVICES' indices
    honoured); [] without nvidia-smi or GPUs."""
    import shutil
    import subprocess
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=pci.bus_id", "--format=csv,noheader"], capture_output=True,
                             timeout=10).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        return []
    nodes = []
    for bus_id in (line.strip().lower() for line in out.splitlines() if ":" in line):
        domain, bus = bus_id.split(":", 1)   # 00000000:dc:00.0 is sysfs' 0000:dc:00.0
        path = "/sys/bus/pci/devices/%s:%s/numa_node" % (domain[-4:].rjust(4, "0"), bus)
        node = _CpuTopology._read(path)
        nodes.append(max(int(node), 0) if node.lstrip("-").isdigit() else 0)
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        picked = []
        for entry in visible.split(","):
            if not entry.strip().isdigit() or int(entry) >= len(nodes):
                break
            picked.append(nodes[int(entry)])
        nodes = picked
    return nodes


def _numa_plan(mode, nproc, topo, gpu_nodes=()):
    """The CPUs of each local rank for --numa-binding `mode`. A worker's NUMA node is its GPU's (the
    local_rank-th visible GPU, as torch binds); without one, local ranks are spread over the NUMA
    nodes in blocks. ``node``: the node's CPUs; ``socket``: every CPU of the node's package;
    ``exclusive``: the node's physical cores split evenly among the workers placed on it;
    ``core-complex``: one last-level-cache group of the node's CPUs per worker, in turn."""
    nodes = sorted(topo.nodes)
    placed = [gpu_nodes[r] if r < len(gpu_nodes) and gpu_nodes[r] in topo.nodes
              else nodes[r * len(nodes) // nproc] for r in range(nproc)]
    plan = []
    for r, node in enumerate(placed):
        cpus = topo.nodes[node]
        if mode == "socket":
            package = topo.package[cpus[0]]
            cpus = [c for n in nodes for c in topo.nodes[n] if topo.package[c] == package]
        elif mode in ("exclusive", "core-complex"):
            key = topo.core if mode == "exclusive" else topo.cache
            groups = {}
            for c in cpus:
                groups.setdefault(key[c], []).append(c)
            groups = sorted(groups.values())
            peers = [q for q in range(nproc) if placed[q] == node]
            i, k = peers.index(r), len(peers)
            if mode == "exclusive" and len(groups) >= k:
                cpus = [c for g in groups[i * len(groups) // k:(i + 1) * len(groups) // k] for c in g]
            else:
                cpus = groups[i % len(groups)]
        plan.append(set(cpus))
    return plan


_CPUS_VAR = "ELASTICRUN_CPUS"   # a worker's --numa-binding CPUs, taken out of its environment at start


def _take_cpu_binding(environ):
    """In a worker, before its code runs: bind it to the CPUs the agent chose (threads it starts
    inherit them) and drop the variable that carried them, so the script never sees it."""
    text = environ.pop(_CPUS_VAR, None)
    if text:
        try:
            os.sched_setaffinity(0, _cpu_list(text))
        except (OSError, ValueError) as e:
            sys.stderr.write("elasticrun: cannot bind to CPUs %s: %s\n" % (text, e))


class _Worker:
    """One worker of an attempt: its ranks, environment, where its output goes, and its handle."""

    def __init__(self, local_rank, global_rank, env, dests, rank_dir, prefix):
        self.local_rank = local_rank
        self.global_rank = global_rank
        self.env = env
        self.error_file = env["TORCHELASTIC_ERROR_FILE"]
        self.dests = dests                 # (stdout, stderr): "console", "file" or "tee"
        self.log_paths = (os.path.join(rank_dir, "stdout.log"), os.path.join(rank_dir, "stderr.log"))
        self.prefix = prefix
        self.handle = None
        self.exitcode = None
        self.exit_time = None
        self.stack_file = env.get(_STACK_FILE_VAR)   # None: not a Python worker
        self.stack = None                            # its dump, once asked for before a kill

    @property
    def pid(self):
        return self.handle.pid

    def poll(self):
        """Exit code once exited (reaped), else None; notes when the exit was first seen."""
        if self.exitcode is None:
            self.exitcode = self.handle.poll()
            if self.exitcode is not None:
                self.exit_time = time.time()
        return self.exitcode

    def wait_fds(self):
        fds = [self.handle.wait_fd if self.exitcode is None else None, self.handle.result_fd]
        return [fd for fd in fds if fd is not None]

    def tee_tails(self):
        """(path, console fd) of each stream that is tee'd: a log pump copies it to the console."""
        return [(path, fd) for dest, path, fd in zip(self.dests, self.log_paths, (1, 2)) if dest == "tee"]


# How each kind is started. A starter's start(w) gives the worker its handle, or leaves it None and
# hands it out in finish(workers) (the fork server forks while we prepare the next worker).

class _ProgramStarter:
    """Programs (and scripts without a fork server) as subprocesses."""

    def __init__(self, entrypoint, args):
        self._argv = [entrypoint] + [str(a) for a in args]
        self._python = _python_script(entrypoint, args) is not None   # it needs the bootstrap
        self._prctl = None   # resolved on first use: the fork-server path never needs ctypes here

    def adopter(self, helpers):
        return None   # what an exec'd program starts carries its environment, and the mark finds it

    def start(self, w):
        import subprocess
        if self._prctl is None:
            self._prctl = _prctl() or False
        prctl, parent = self._prctl or None, os.getpid()
        env = python_environment() if self._python else dict(os.environ)
        env.update(w.env)
        cpus = {_CPUS_VAR: env.pop(_CPUS_VAR)} if _CPUS_VAR in env else {}
        files = []
        try:
            for dest, path in zip(w.dests, w.log_paths):
                # tee'd streams too: the worker writes its own file and the pump tails it, so a
                # console nobody reads never blocks the worker
                files.append(None if dest == "console" else open(path, "ab", buffering=0))
            popen = subprocess.Popen(list(_with_local_rank(self._argv, w.local_rank)), env=env,
                                     stdout=files[0], stderr=files[1], start_new_session=True,
                                     preexec_fn=lambda: _start_program(prctl, parent, cpus))
        finally:
            for f in files:
                if f is not None:
                    f.close()
        w.handle = _ProgramHandle(popen)

    def finish(self, workers):
        pass


def _start_program(prctl, parent, cpus):
    """In a program worker between fork and exec."""
    _die_with_parent(prctl, parent)
    _take_cpu_binding(cpus)


class _ForkServerStarter:
    """Python-script workers (an entrypoint from ``python_command``) forked by the fork server."""

    def __init__(self, server, mode, script, args):
        self._server, self._mode, self._script, self._args = server, mode, script, list(args)

    def start(self, w):
        files = []
        try:
            for dest, path in zip(w.dests, w.log_paths):
                files.append(None if dest == "console" else open(path, "ab", buffering=0))
            fds = [None if f is None else f.fileno() for f in files]
            self._server.request(self._mode, self._script, _with_local_rank(self._args, w.local_rank),
                                 w.env, fds[0], fds[1])
        finally:
            for f in files:
                if f is not None:
                    f.close()

    def finish(self, workers):
        for w in workers:
            w.handle = _ForkedHandle(self._server, self._server.next_pid())

    def adopter(self, helpers):
        """The fork server is the subreaper of every worker's descendants, and nothing else's."""
        return self._server.pid, ()


class _FunctionStarter:
    """Callables in multiprocessing children (spawn, fork or forkserver)."""

    def __init__(self, fn, args, start_method, role, adopt_orphans=False):
        import multiprocessing
        self._ctx = multiprocessing.get_context(start_method)
        self._fn, self._args, self._method, self._role = fn, tuple(args), start_method, role
        self._adopt = adopt_orphans

    def adopter(self, helpers):
        """(the subreaper whose descendants teardown kills, the pids it spares), or None."""
        if not self._adopt:
            return None
        import multiprocessing.resource_tracker as tracker
        spared = set(helpers) | {getattr(tracker._resource_tracker, "_pid", None)}
        forkserver = sys.modules.get("multiprocessing.forkserver")
        if forkserver is not None:
            spared.add(getattr(forkserver._forkserver, "_forkserver_pid", None))
        return os.getpid(), spared

    def start(self, w):
        if self._adopt:
            _set_subreaper(_prctl())
        paths = [None if dest == "console" else path for dest, path in zip(w.dests, w.log_paths)]
        reader, writer = self._ctx.Pipe()   # duplex: the value comes back, the release goes out
        # forkserver children have the forkserver for a parent, not us
        parent = None if self._method == "forkserver" else os.getpid()
        process = self._ctx.Process(target=_function_worker, name="%s-%d" % (self._role, w.local_rank),
                                    args=(self._fn, _with_local_rank(self._args, w.local_rank), w.env,
                                          writer, paths[0], paths[1], parent, self._method == "fork"))
        process.start()
        writer.close()
        w.handle = _ChildHandle(process, reader)

    def finish(self, workers):
        pass


def _starter(spec, start_method, fork_server=None, adopt_orphans=False):
    """The starter for a spec's workers: callables in multiprocessing children; Python scripts (an
    entrypoint from python_command) from the fork server when there is one; other programs, and
    scripts without a fork server, as subprocesses."""
    if not isinstance(spec.entrypoint, str):
        return _FunctionStarter(spec.entrypoint, spec.args, start_method, spec.role, adopt_orphans)
    script = _python_script(spec.entrypoint, spec.args) if fork_server is not None else None
    if script is not None:
        return _ForkServerStarter(fork_server, *script)
    return _ProgramStarter(spec.entrypoint, spec.args)


def _is_python_spec(spec):
    """Whether a spec's workers are Python (a callable, or a script from python_command): those arm
    the stack dump; a program (``--no-python``) has no Python stack to give."""
    return not isinstance(spec.entrypoint, str) or _python_script(spec.entrypoint, spec.args) is not None


def _python_script(entrypoint, args):
    """(mode, script, args) when `entrypoint` + `args` come from python_command(), else None."""
    args = [str(a) for a in args]
    if entrypoint != sys.executable or args[:3] != ["-u", "-c", _BOOT_STUB] or len(args) < 4:
        return None
    if args[3] == "-m":
        return ("-m", args[4], args[5:]) if len(args) >= 5 else None
    return "-s", args[3], args[4:]


# ------------------------------------------------------------------------------------- Worker group

class _Tail:
    """One tee'd log file followed from its start: its new bytes, and its complete lines with the
    worker's prefix. A partial line waits for its newline (the console interleaves whole lines
    only), or for the final read, which ends it with one."""

    _MAX_PARTIAL = 1 << 16  # a longer line (a progress bar redrawn with \r) is cut, not hoarded

    def __init__(self, path, console_fd, prefix, filters=None):
        self.path = path
        self.console_fd = console_fd
        self.prefix = prefix.encode()
        self.partial = b""
        self._file = None
        self._filters = None if filters is None else [f.encode() for f in filters]

    def read(self, size):
        """Up to `size` new bytes; b"" while there are none (or the file does not exist yet: a
        callable worker creates its own)."""
        if self._file is None:
            try:
                self._file = open(self.path, "rb", buffering=0)
            except OSError:
                return b""
        return self._file.read(size) or b""

    def unread(self):
        """Bytes written to the file that read() has not returned yet."""
        self.read(0)  # opens the file if it exists by now
        if self._file is None:
            return 0
        return os.fstat(self._file.fileno()).st_size - self._file.tell()

    def lines(self, data, final=False):
        """The complete lines of what was held back plus `data`, each prefixed; keeps the rest
        (ends it with a newline instead when `final`, or when it outgrows _MAX_PARTIAL)."""
        *lines, rest = (self.partial + data).split(b"\n")
        if rest and (final or len(rest) > self._MAX_PARTIAL):
            lines.append(rest)
            rest = b""
        self.partial = rest
        if self._filters is not None:
            lines = [line for line in lines if any(f in line for f in self._filters)]
        return b"".join(self.prefix + line + b"\n" for line in lines)

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


class _LogPump:
    """One thread copying tee'd worker output, line by line and with the line prefix, to the
    console. As torchrun does, each tee'd worker writes its log file itself and this thread tails
    the file, so a console nobody reads (a paused terminal, a slow log shipper, ``| less`` not
    scrolled) blocks only this thread, never a worker's print().

    A regular file cannot wake a reader, so the tails are polled every `interval` seconds (at once
    again while they have more). stop() copies everything the files hold once the workers are gone,
    and waits for the console as long as it takes some output every `stall_timeout` seconds: past
    that the launcher gives up on it (the lines stay in the log files) rather than never exit."""

    _CHUNK = 1 << 16  # bytes per read: a worker far ahead of the console costs no memory

    def __init__(self, interval=0.1, stall_timeout=30.0):
        import threading
        self._tails = []
        self._files = {}   # path -> fd of the duplicate files (see add_tail)
        self._interval = interval
        self._stall_timeout = stall_timeout
        self._progress = time.monotonic()  # last time the console took output
        self._stop = threading.Event()
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name="elastic-log-pump", daemon=True)

    def add_tail(self, path, console_fd, prefix, filters=None):
        """Copy `path` to the fd `console_fd`; or, with `filters`, its lines holding any of them to
        the file `console_fd` names (opened here once, shared by every tail that names it)."""
        if filters is not None:
            if console_fd not in self._files:
                self._files[console_fd] = os.open(console_fd, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            console_fd = self._files[console_fd]
        self._tails.append(_Tail(path, console_fd, prefix, filters))

    def start(self):
        if self._tails:
            self._thread.start()
        else:
            self._close_files()

    def _write(self, fd, data):
        """All of `data` to the console fd: os.write may take part of it (a signal mid-write)."""
        view = memoryview(data)
        while view and not self._abandoned:
            try:
                n = os.write(fd, view)
            except OSError:
                return  # a closed console (EPIPE): these lines are in the log file only
            view = view[n:]
            self._progress = time.monotonic()

    def _copy_new(self):
        """A chunk of each tail to the console; True when some tail may have more right away."""
        more = False
        for t in self._tails:
            data = t.read(self._CHUNK)
            self._write(t.console_fd, t.lines(data))
            more = more or len(data) == self._CHUNK
        return more

    def _copy_rest(self, t):
        """What `t` holds now, to its end (bounded: an escaped grandchild may still be writing)."""
        left = t.unread()
        while left > 0 and not self._abandoned:
            data = t.read(min(left, self._CHUNK))
            if not data:
                break
            left -= len(data)
            self._write(t.console_fd, t.lines(data))
        self._write(t.console_fd, t.lines(b"", final=True))

    def _run(self):
        try:
            while not self._stop.is_set():
                if not self._copy_new():
                    self._stop.wait(self._interval)
            for t in self._tails:  # stop() comes after the workers exited: nothing more to wait for
                self._copy_rest(t)
        finally:
            for t in self._tails:
                t.close()
            self._close_files()

    def _close_files(self):
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def stop(self):
        """Copy the rest to the console and end the thread (bounded by `stall_timeout`)."""
        self._progress = max(self._progress, time.monotonic())  # a stall before now counts from now
        self._stop.set()
        while self._thread.is_alive():
            left = self._progress + self._stall_timeout - time.monotonic()
            if left <= 0:
                self._abandoned = True
                log.warning("the console took no output for %.0f s: the rest of the tee'd output "
                            "is in the log files only", self._stall_timeout)
                return
            self._thread.join(left)


class _WorkerSetup:
    """How an agent makes each attempt's worker group: a folder per worker under the run's log
    folder (``attempt_<n>/<local rank>``: error file, stack file), its environment (rank variables,
    torchelastic's, the tree mark, the timer and stack files, its CPUs with ``numa_binding``), output
    streams and line prefix, and the group's starter, reaper, file timer and filtered copies of the
    output. ``begin()`` names what each run() has anew."""

    def __init__(self, spec, logs, prefix_template, starter, stack_signal=None):
        self._spec, self._logs, self._prefix_template = spec, logs, prefix_template
        self._starter, self._stack_signal = starter, stack_signal
        self._run_id = self._tree_token = self._reaper = self._timer = None
        self._numa = None          # each local rank's CPUs with spec.numa_binding (first start)

    def begin(self, run_id, tree_token, reaper, timer=None):
        self._run_id, self._tree_token, self._reaper, self._timer = run_id, tree_token, reaper, timer

    def group(self, attempt, ranks, restart_count):
        """The _WorkerGroup of attempt number `attempt` for the round's _RankAssignment `ranks`."""
        spec = self._spec
        attempt_dir = os.path.join(self._logs.root_log_dir, "attempt_%d" % attempt)
        workers = self._workers(attempt_dir, ranks, restart_count)
        duplicates = [(os.path.join(attempt_dir, "filtered_%s.log" % name), filters)
                      for name, filters in (("stdout", spec.duplicate_stdout_filters),
                                            ("stderr", spec.duplicate_stderr_filters))]
        return _WorkerGroup(workers, self._starter, self._reaper, self._tree_token, self._timer,
                            [(path, f) if f else (None, None) for path, f in duplicates])

    def _workers(self, attempt_dir, ranks, restart_count):
        """The workers of one attempt (not started), their folders under `attempt_dir`."""
        from string import Template
        spec = self._spec
        prefix = Template(self._prefix_template)
        workers = []
        for local_rank in range(spec.local_world_size):
            rank_dir = os.path.join(attempt_dir, str(local_rank))
            os.makedirs(rank_dir)
            rank = ranks.base_rank + local_rank
            workers.append(_Worker(
                local_rank, rank, self.env(ranks, local_rank, os.path.join(rank_dir, "error.json"), restart_count),
                self._logs.streams(local_rank, rank), rank_dir,
                prefix.safe_substitute(role_name=spec.role, local_rank=local_rank, rank=rank)))
        if spec.numa_binding:
            if self._numa is None:             # the machine's topology, read once per agent
                self._numa = _numa_plan(spec.numa_binding, spec.local_world_size, _CpuTopology(),
                                        _gpu_numa_nodes(os.environ))
            for w in workers:
                w.env[_CPUS_VAR] = ",".join(str(c) for c in sorted(self._numa[w.local_rank]))
        return workers

    def env(self, ranks, local_rank, error_file, restart_count):
        """The environment variables one worker gets beside the launcher's."""
        spec = self._spec
        env = ranks.env(local_rank, spec.role)
        env.update({
            "TORCHELASTIC_RESTART_COUNT": str(restart_count),
            "TORCHELASTIC_MAX_RESTARTS": str(spec.max_restarts),
            "TORCHELASTIC_RUN_ID": self._run_id,
            "TORCHELASTIC_USE_AGENT_STORE": str(False),
            "TORCHELASTIC_ERROR_FILE": error_file,
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
            _TREE_VAR: _tree_mark(self._tree_token, os.environ.get(_TREE_VAR)),
        })
        if spec.local_world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = "1"
        if self._timer is not None:
            env[TORCHELASTIC_TIMER_FILE] = self._timer.file_path
        if spec.virtual_local_rank:
            env.update(_virtual_local_rank_env(local_rank, os.environ))
        if self._stack_signal is not None:
            env[_STACK_FILE_VAR] = os.path.join(os.path.dirname(error_file), "stack.txt")
            env[_STACK_SIGNAL_VAR] = str(self._stack_signal)
        return env


class _WorkerGroup:
    """The workers of one attempt, their log pump, and their teardown.

    ``start()`` starts every worker through a starter and tells the reaper their groups;
    ``poll()`` reports exits; ``stop(sig, grace)`` is the one teardown, on every path (success,
    restart, failure, stop signal). The grace policy lives here and nowhere else: `sig` to each
    worker's group and to the marked processes outside them, ``grace`` seconds for all of them to
    end, SIGKILL to what is left, reap; then SIGKILL to whatever still carries the agent's mark,
    again for up to KILL_WAIT seconds (a process in uninterruptible sleep dies when its I/O ends);
    finally the tee'd output is copied to the console, for as long as the console takes some of it
    every CONSOLE_STALL seconds."""

    KILL_WAIT = 2.0
    CONSOLE_STALL = 30.0

    def __init__(self, workers, starter, reaper, tree_token, timer=None, duplicates=()):
        self.workers = workers
        self._starter, self._reaper, self._token, self._timer = starter, reaper, tree_token, timer
        self._pump = _LogPump(stall_timeout=self.CONSOLE_STALL)
        self._duplicates = duplicates      # ((path, filters) for stdout, for stderr): see WorkerSpec
        self._stopped = self._released = False
        import threading
        self._stack_lock = threading.Lock()
        self.outlived_grace = {}   # global rank -> ProcessFailure of a worker SIGKILLed after the grace
        self.stopped_ranks = set()     # the workers still running when stop() began

    def start(self, stopping=lambda: False):
        """Start the workers in local-rank order; when `stopping()` turns true, start no more (the
        caller answers the stop signal; stop() tears down the ones started). Once all have started,
        their pids are the only ones the file timer may signal."""
        if self._timer is not None:
            self._timer.pop_expired()          # the last attempt's expiries are reported already
            # until the new pids are named, timers are held: a worker is never missed, nobody
            # else is signalled
            self._timer.set_worker_pids((), starting=True)
            self._timer.before_signal = self.dump_stack   # the report shows where it hung
        started = []
        for w in self.workers:
            if stopping():
                break
            self._starter.start(w)
            started.append(w)
            for path, console_fd in w.tee_tails():
                self._pump.add_tail(path, console_fd, w.prefix)
                dup_path, filters = self._duplicates[console_fd - 1] if self._duplicates else (None, None)
                if filters:
                    self._pump.add_tail(path, dup_path, w.prefix, filters)
        self._starter.finish(started)
        for w in started:
            self._reaper.watch(w.pid)
        self._pump.start()
        if self._timer is not None and not stopping():
            self._timer.set_worker_pids([w.pid for w in self.workers])

    def wait(self, timeout, interruptible):
        """Sleep until a worker may have exited or returned its value, or `timeout` seconds pass (at
        most 0.01 s when a live worker has no fd to wait on), inside `interruptible` (the stop flag's
        safe wait); then poll()."""
        import select
        if not all(w.exitcode is not None or w.handle.wait_fd is not None for w in self.workers):
            timeout = min(timeout, 0.01)
        poller = select.poll()
        for fd in [fd for w in self.workers for fd in w.wait_fds()]:
            poller.register(fd, select.POLLIN)
        with interruptible:
            ready = [fd for fd, _ in poller.poll(timeout * 1000.0)]
        return self.poll(ready)

    def poll(self, ready=()):
        """(workers done, {global rank: failed worker}); takes in return values that are `ready`,
        and once every worker has returned (or exited 0) releases those that wait to exit. A
        worker whose value cannot be read has failed."""
        done, failed, returned = 0, {}, 0
        for w in self.workers:
            if w.handle.result_fd in ready:
                w.handle.take_result(block=False)
            code = w.poll()
            if code == 0:
                w.handle.take_result(block=True)   # the value a callable still owes, if any
            if w.handle.result_error is not None:
                failed[w.global_rank] = w
            elif code == 0:
                done += 1
            elif code is not None:
                failed[w.global_rank] = w
            returned += code == 0 or w.handle.has_result
        if returned == len(self.workers) and not failed and not self._released:
            self._released = True
            for w in self.workers:
                w.handle.release()
        return done, failed

    def failures(self, failed, role):
        """{global rank: ProcessFailure} of `failed` workers, naming the file-timer scope a worker
        overran when that is why it died."""
        # the timer server records an expiry before it signals, so a death we see here is on the list
        scopes = {} if self._timer is None else {pid: s for pid, s, _ in self._timer.pop_expired()}
        failures = {}
        for rank, w in failed.items():
            unread = w.handle.result_error
            f = _worker_failure(w.local_rank, w.pid, w.exitcode or 1 if unread else w.exitcode,
                                w.error_file, message=unread, rank=rank, role=role, exit_time=w.exit_time,
                                stderr_log=w.log_paths[1] if w.dests[1] != "console" else None)
            if w.pid in scopes:
                f.message = "%s (overran file-timer scope %s)" % (f.message, scopes[w.pid])
            if w.stack:
                f.stack = w.stack
                f.message = "%s; %s" % (f.message, _stack_site(w.stack))
                f.error_file_data = _write_stack_error(w, f.message) or f.error_file_data
            failures[rank] = f
        return failures

    def return_values(self):
        return {w.global_rank: w.handle.result for w in self.workers}

    def stop(self, sig, grace, events=None, hurry=None):
        """Tear the attempt down (see the class); the second call does nothing. `events` narrates
        it; `hurry` (a stop flag) ends the grace at once when its signal comes a second time."""
        if self._stopped:
            return
        self._stopped = True
        events = events or _Events()
        hurry = hurry or _NoStop()
        if self._timer is not None:
            self._timer.set_worker_pids(())  # from now on their pids may be reused by anyone
        started = [w for w in self.workers if w.handle is not None]   # all, unless start() stopped
        running = [w for w in started if w.poll() is None]
        self.stopped_ranks = {w.global_rank for w in running}
        for w in started:
            w.handle.signal(sig)
        groups = {w.pid for w in started}
        strays = _signal_marked(self._token, sig, groups)
        adopter = self._starter.adopter({self._reaper.pid})
        if adopter is not None:
            for pid, pgid in _descendants(*adopter).items():
                if pgid not in groups:
                    try:
                        os.kill(pid, sig)
                        strays.append(pid)
                    except OSError:
                        pass
        if running:
            events.emit("stopping", workers=len(running), signal=_signal_name(sig), grace=grace,
                        can_hurry=hurry.hurry_fd is not None and hurry.signum is not None,
                        ranks=[w.global_rank for w in running])
        left = self._wait_gone(started, strays, time.monotonic() + grace, hurry, bool(running),
                               before_kill=lambda left: self._outlived_grace(left, sig, grace))
        if left:
            again = hurry.again
            events.emit("kill", why="second signal" if again else "grace over", grace=grace,
                        signal=_signal_name(again) if again else None,
                        alive=[{"rank": w.global_rank, "pid": w.pid} for w in left])
        for w in started:
            if w.poll() is None:
                w.handle.wait()
                w.poll()
            self._reaper.forget(w.pid)
            w.handle.close()
        # after the reap: no worker is left to start another one meanwhile
        _kill_marked(self._token, self.KILL_WAIT)
        if adopter is not None:
            _kill_descendants(adopter[0], adopter[1], self.KILL_WAIT)
        self._pump.stop()

    def stacks(self, workers=None):
        """{worker: stack} of the live `workers` (default: all started), asked for all at once;
        dumps are asked one batch at a time (a worker writes them all to one file)."""
        if workers is None:
            workers = [w for w in self.workers if w.handle is not None and w.exitcode is None]
        with self._stack_lock:
            return _ask_stacks(workers)

    def dump_stack(self, pid):
        """Ask the worker `pid` for its stack (the file timer, before it kills one); kept for the report."""
        for w, stack in self.stacks([w for w in self.workers if w.handle is not None and w.pid == pid]).items():
            w.stack = stack

    def _outlived_grace(self, workers, sig, grace):
        """Workers still there after `grace` seconds: where each one was, in the log and in its error
        file, before the SIGKILL."""
        for w, stack in self.stacks([w for w in workers if w.exitcode is None]).items():
            w.stack = stack
        for w in workers:
            if w.exitcode is not None:
                continue
            what = "rank %d (pid %d) outlived the %g s grace period after %s: SIGKILL" % (
                w.global_rank, w.pid, grace, _signal_name(sig))
            log.warning("%s; %s:\n%s", what, _stack_site(w.stack), w.stack)
            _write_stack_error(w, "%s; %s" % (what, _stack_site(w.stack)))
            f = _worker_failure(w.local_rank, w.pid, -signal.SIGKILL, w.error_file, rank=w.global_rank,
                                role=w.env.get("ROLE_NAME", "default"),
                                message="%s; %s" % (what, _stack_site(w.stack)))
            f.stack = w.stack
            self.outlived_grace[w.global_rank] = f

    @staticmethod
    def _wait_gone(workers, strays, deadline, hurry, narrate=False, before_kill=None):
        """Wait until every worker's group and every stray is gone, `deadline`, or `hurry` says a
        stop signal came again; then SIGKILL the groups that are left (after `before_kill(left)`
        when the grace ran out, not when told to hurry), and return their workers.
        It sleeps on the workers' own descriptors while they run; a group's other members and the
        strays have none, so those are looked at every 5 ms."""
        import select
        pending = list(workers)
        pace = _store._Pace()
        while True:
            pending = [w for w in pending if w.poll() is None or _group_alive(w.pid)]
            strays = [pid for pid in strays if _alive(pid)]
            left = deadline - time.monotonic()
            if not (pending or strays) or left <= 0 or hurry.again:
                break
            if narrate and pending and pace.due():
                log.info("still waiting for %s to exit: %s (%d s left)", _plural(len(pending), "worker"),
                         _ranks_text([{"rank": w.global_rank, "pid": w.pid} for w in pending]), round(left))
            fds = [w.handle.wait_fd for w in pending if w.exitcode is None]
            if fds and None not in fds:
                poller = select.poll()
                for fd in set(fds) | ({hurry.hurry_fd} - {None}):
                    poller.register(fd, select.POLLIN)
                poller.poll(min(left, 1.0) * 1000.0)   # at least once a second: the narration
            else:
                time.sleep(min(0.005, left))
        if pending and before_kill is not None and not hurry.again:
            before_kill(pending)
        for w in pending:
            w.handle.signal(signal.SIGKILL)
        return pending


# --------------------------------------------------------------------------------- Local rendezvous
# The round of a WorkerSpec without a rendezvous handler.

class _LocalInfo:
    def __init__(self, store, round_, master_addr, master_port):
        self.store = store
        self.rank = 0
        self.world_size = 1
        self.master_addr = master_addr
        self.master_port = master_port
        self.round = round_


class _LocalRendezvous:
    """One node, no peers: an in-process store and a fresh worker port per round."""

    def __init__(self, run_id=None, addr=None):
        self._run_id = run_id or os.urandom(6).hex()
        self._addr = addr or "127.0.0.1"
        self._store = None
        self._round = -1
        self._closed = False

    def next_rendezvous(self):
        if self._closed:
            raise _rdzv.RendezvousClosedError("the run is closed")
        if self._store is None:
            self._store = _store.TCPStore("127.0.0.1", 0, is_master=True)
        self._round += 1
        return _LocalInfo(_store.PrefixStore("round/%d" % self._round, self._store), self._round,
                          self._addr, _rdzv._free_port())

    def is_closed(self):
        return self._closed

    def set_closed(self):
        self._closed = True

    def num_nodes_waiting(self):
        return 0

    def round_broken(self):
        return False

    def get_run_id(self):
        return self._run_id

    def shutdown(self):
        if self._store is not None:
            self._store.close()
            self._store = None
        return True


# ------------------------------------------------------------------------------------------- Events
# Everything the agent does that an operator may want to know happens once, as an event: one JSON
# line in the event log, and, from the same fields, the line the console shows. Keys: see the module
# docstring ("Event log").

_EVENT_LEVELS = {"worker_started": logging.DEBUG,
                 "rendezvous": logging.DEBUG, "kill": logging.WARNING, "node_lost": logging.WARNING,
                 "failure": logging.WARNING}


def _plural(n, word):
    return "%d %s%s" % (n, word, "" if n == 1 else "s")


def _seconds(s):
    return "%.0f s" % s if s >= 100 else "%.3g s" % s


def _how_ended(e):
    if e.get("signal"):
        return "killed by %s" % e["signal"]
    return "exited with code %s" % e.get("code")


def _ranks_text(workers):
    return ", ".join("rank %s (pid %s)" % (w["rank"], w["pid"]) for w in workers)


def _say_start(e):
    return ("elasticrun %(version)s: run %(run_id)s, rendezvous %(backend)s at %(endpoint)s, nnodes "
            "%(nnodes)s, nproc %(nproc)s, max restarts %(max_restarts)s, log folder %(log_dir)s, this node "
            "%(addr)s (host %(host)s, pid %(pid)s)" % e)


_EVENT_MEMBERS_MAX = 64   # a round event lists its members up to this many nodes


def _say_round(e):
    hosts = "..." if e["members"] is None else ", ".join(m.get("host") or m["addr"] for m in e["members"])
    return ("rendezvous round %s done in %s: %s (%s), world size %d; this node is group rank %d with "
            "ranks %d-%d (master %s)" % (e["round"], _seconds(e["duration"]), _plural(e["nodes"], "node"),
                                         hosts, e["world_size"], e["group_rank"], e["ranks"][0],
                                         e["ranks"][1], e["master"]))


def _say_failure(e):
    return "worker failure: rank %s (local rank %s) on %s, pid %s, %s: %s" % (
        e["rank"], e["local_rank"], e["failure_host"], e["pid"], _how_ended(e), e["message"])


def _say_restart(e):
    if e["why"] in ("failure", "peer failure"):
        return "%s: restarting the worker group (%d/%d)" % (e["why"], e["count"], e["max"])
    return "%s: restarting the worker group (restart budget untouched)" % e["why"]


def _say_restarted(e):
    return ("workers running again %s after the %s (detect %s, stop %s, rendezvous %s, start %s)"
            % (_seconds(e["total"]), e["why"], _seconds(e["detect"]), _seconds(e["stop"]),
               _seconds(e["rendezvous"]), _seconds(e["start"])))


def _say_stopping(e):
    text = "stopping %s (%s), waiting up to %s" % (_plural(e["workers"], "worker"), e["signal"],
                                                  _seconds(e["grace"]))
    return text + ("; send the signal again to kill now" if e["can_hurry"] else "")


def _say_kill(e):
    if e["why"] == "second signal":
        return "second %s: killing %s now (SIGKILL): %s" % (
            e["signal"], _plural(len(e["alive"]), "worker"), _ranks_text(e["alive"]))
    return "%s still alive after the %s grace: %s; killing them (SIGKILL)" % (
        _plural(len(e["alive"]), "worker"), _seconds(e["grace"]), _ranks_text(e["alive"]))


def _say_exit(e):
    if e["state"] == WorkerState.STOPPED:
        done = ("%s torn down" % _plural(e["workers_started"], "worker") if e["workers_started"]
                else "no worker had started")
        return "stopped by %s; %s; exit status %s" % (e["signal"], done, e["code"])
    if e["state"] == WorkerState.SUCCEEDED:
        return "exit status 0 after %s (%s)" % (_seconds(e["elapsed"]), _plural(e["restarts"], "restart"))
    return "exit status %s after %s (%s, %s)" % (e["code"], _seconds(e["elapsed"]), e["state"],
                                                  e.get("error") or _plural(e["restarts"], "restart"))


_SAY = {
    "start": _say_start,
    "rendezvous": lambda e: "joining rendezvous (%s)" % e["why"],
    "round": _say_round,
    "scale_change": lambda e: "the job changed size: %d -> %d nodes" % (e["from_nodes"], e["to_nodes"]),
    "worker_started": lambda e: "worker rank %(rank)s (local rank %(local_rank)s) started: pid %(pid)s" % e,
    "worker_exited": lambda e: "worker rank %s (pid %s) %s%s" % (
        e["rank"], e["pid"], _how_ended(e), " (stopped by the agent)" if e["by_agent"] else ""),
    "succeeded": lambda e: "all %s succeeded" % _plural(e["workers"], "worker"),
    "failure": _say_failure,
    "node_lost": lambda e: "a node was lost from round %s: %s" % (e["round"], e["reason"]),
    "restart": _say_restart,
    "restarted": _say_restarted,
    "gave_up": lambda e: "worker group failed; restart budget (%d) spent" % e["max"],
    "stop_signal": lambda e: "received %s" % e["signal"],
    "stopping": _say_stopping,
    "kill": _say_kill,
    "exit": _say_exit,
}


def _event_log_file(event_log, log_dir):
    """The event log's path from the agent's ``event_log`` (True: events.jsonl in the log folder)."""
    return os.path.join(log_dir, "events.jsonl") if event_log is True else (event_log or None)


def _start_fields(handler, spec, log_dir, event_log):
    """The start event's fields: what this node runs, where, and with which settings."""
    params = getattr(handler, "params", None)
    backend = endpoint = nnodes = "local"
    if params is not None:
        backend, nnodes = params.backend, "%d:%d" % (params.min_nodes, params.max_nodes)
        if params.min_nodes == params.max_nodes:
            nnodes = str(params.min_nodes)
        if params.backend == "etcd":
            endpoint = ",".join(params.endpoints)
        else:
            port = getattr(getattr(handler, "store", None), "port", params.port)
            endpoint = "%s:%s" % (params.host, port)
    addr = getattr(handler, "local_addr", None) or spec.local_addr or _hostname()
    return {"version": __version__, "backend": backend, "endpoint": endpoint, "nnodes": nnodes,
            "nproc": spec.local_world_size, "max_restarts": spec.max_restarts, "log_dir": log_dir,
            "event_log": event_log, "addr": addr, "pid": os.getpid(), "role": spec.role}


def _round_fields(info, ranks, peers, local_addr, duration):
    """The round event's fields: `ranks` this node's _RankAssignment, `peers` every node's
    (role, worker count) in group-rank order."""
    members = None
    # the member list costs every node O(nodes) bytes: named in the event for a modest round only
    if info.world_size <= _EVENT_MEMBERS_MAX:
        known = getattr(info, "members", None) or [(local_addr or _hostname(), None)]
        bases = list(itertools.accumulate([0] + [n for _, n in peers]))
        members = [{"addr": m[0], "id": m[1], "host": m[2] if len(m) > 2 else None,
                    "ranks": [bases[i], bases[i + 1] - 1]} for i, m in enumerate(known)]
    return {"round": getattr(info, "round", None), "nodes": info.world_size, "world_size": ranks.world_size,
            "group_rank": info.rank, "ranks": [ranks.base_rank, ranks.base_rank + ranks.local_world_size - 1],
            "master": "%s:%s" % (ranks.master_addr, ranks.master_port), "duration": round(duration, 3),
            "members": members}


def _restarted_fields(restarting, rdzv_done, now):
    """The restarted event's fields: where the time of a restart went, from `restarting` (why, the
    failure's time, detected, stopped), the round's end and `now` (the workers started)."""
    why, failed, detected, stopped = restarting
    return {"why": why, "total": round(now - failed, 3), "detect": round(detected - failed, 3),
            "stop": round(stopped - detected, 3), "rendezvous": round(rdzv_done - stopped, 3),
            "start": round(now - rdzv_done, 3)}


def _started(workers, attempt):
    """The worker_started events of attempt number `attempt`."""
    return [{"rank": w.global_rank, "local_rank": w.local_rank, "pid": w.pid, "attempt": attempt}
            for w in workers]


def _untold_exits(group, attempt, told, first=()):
    """The worker_exited events of `group` (attempt `attempt`) whose exit is known and not yet in
    `told` (which they join): the ranks in `first` (the failures that ended the attempt) first."""
    exits = []
    for w in sorted(group.workers, key=lambda w: (w.global_rank not in first, w.global_rank)):
        if w.handle is None or w.exitcode is None or (attempt, w.global_rank) in told:
            continue
        told.add((attempt, w.global_rank))
        code = w.exitcode
        exits.append({"rank": w.global_rank, "local_rank": w.local_rank, "pid": w.pid,
                      "code": code if code >= 0 else None, "signal": _signal_name(-code) if code < 0 else None,
                      "by_agent": w.global_rank in group.stopped_ranks, "attempt": attempt})
    return exits


def _exit_fields(result=None, error=None):
    """The exit event's code (the launcher's exit status), and the stop signal or the error, from
    what run() returns or raises."""
    if isinstance(error, _SignalStop):
        return {"code": 128 + error.signum, "signal": _signal_name(error.signum)}
    if error is not None:
        code = 1
        if isinstance(error, _rdzv.RendezvousExcludedError):
            code = _EXIT_EXCLUDED
        elif isinstance(error, _rdzv.RendezvousMismatchError) or getattr(error, "late", False):
            code = 2       # a mistake in the options, as the launcher exits
        return {"code": code, "error": "%s: %s" % (type(error).__name__, error)}
    return {"code": 0 if not result.is_failed() else result.root_cause[1].launcher_exit_code()}


class _Events:
    """The run's events: each one written to the event log (when there is one) as one JSON object on
    a line, fsync'd, then narrated on the console from the same fields, so the two never disagree.
    A log that cannot be written is reported once and dropped; the narration goes on."""

    def __init__(self, path=None, run_id="none", clock=time.time):
        self.path, self._run_id, self._clock = path, run_id, clock
        self._fd = None
        if path:
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0),
                                   0o644)
            except OSError as e:
                log.warning("cannot write the event log %s: %s", path, e.strerror or e)

    def emit(self, kind, **fields):
        return self.emit_all(kind, [fields])[0]

    def emit_all(self, kind, many):
        """Events of one kind that happen together (one per worker): one write and one fsync."""
        import json
        now = round(self._clock(), 3)
        records = []
        for fields in many:
            record = {"time": now, "event": kind, "run_id": self._run_id, "host": _hostname()}
            record.update(fields)
            records.append(record)
        if self._fd is not None and records:
            try:
                os.write(self._fd, "".join(json.dumps(r) + "\n" for r in records).encode())
                os.fsync(self._fd)
            except OSError as e:
                log.warning("cannot write the event log %s: %s; no more events go there", self.path,
                            e.strerror or e)
                self.close()
        say = _SAY.get(kind)
        for record in records if say is not None else ():
            level = _EVENT_LEVELS.get(kind, logging.INFO)
            if kind == "worker_exited":   # a worker's own exit, unless it failed, is no news
                level = logging.WARNING if record["code"] != 0 and not record["by_agent"] else logging.DEBUG
            log.log(level, "%s", say(record))
        return records

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# -------------------------------------------------------------------------------------------- Agent

class _SignalStop(ElasticError):
    """The launcher received one of --signals-to-handle; carries the signal number."""

    def __init__(self, signum):
        ElasticError.__init__(self, "received signal %s" % _signal_name(signum))
        self.signum = signum


class _StopFlag:
    """What the launcher's signal handler does: note the first signal, and raise _SignalStop only
    while the agent is in a wait that is safe to abandon (armed). Elsewhere (reading the fork
    server, tearing down) an exception could lose data mid-read, so the agent checks the note at
    its next safe point instead. A second signal is noted in `again` and makes `hurry_fd`
    readable for good: a teardown waiting out its grace period kills at once."""

    def __init__(self):
        self.signum = None
        self.again = None
        self.armed = 0
        self.listener = None       # the agent's: (kind, signum) of each signal, in the handler
        self._from_job = None      # the stop signal another node sent us (not to be told again)
        self._own_copy_seen = False
        self.hurry_fd, self._hurry_w = os.pipe()
        os.set_blocking(self._hurry_w, False)

    def handler(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            if self.listener is not None and signum != self._from_job:
                self.listener("stop", signum)
            if self.armed:
                raise _SignalStop(signum)
        elif signum == self._from_job and not self._own_copy_seen:
            # the scheduler's own copy of the signal that another node already passed on (a whole
            # job preempted at once): the same stop, not a second signal
            self._own_copy_seen = True
        elif self.again is None:
            self.again = signum
            try:
                os.write(self._hurry_w, b"!")
            except OSError:
                pass

    def close(self):
        for fd in (self.hurry_fd, self._hurry_w):
            os.close(fd)
    def other_handler(self, signum, frame):
        """A signal that stops nothing: one to forward (checkpointing), or the stack signal."""
        if self.listener is not None:
            self.listener("signal", signum)

    def stop_from_job(self, signum):
        """Another node was stopped by `signum`: stop here as if it had come (any thread may call)."""
        import threading
        if self.signum is not None:
            return
        self._from_job = signum
        if signal.getsignal(signum) == self.handler:   # the main thread answers it at once
            signal.pthread_kill(threading.main_thread().ident, signum)
        else:                                          # at the agent's next look
            self.signum = signum

    def check(self):
        if self.signum is not None:
            raise _SignalStop(self.signum)

    def requested(self):
        return self.signum is not None

    def __enter__(self):
        self.check()
        self.armed += 1
        return self

    def __exit__(self, *exc):
        self.armed -= 1


class _NoStop:
    """The stop flag of an agent run from Python: signals are the caller's business."""
    armed = 0
    signum = again = hurry_fd = listener = None

    def stop_from_job(self, signum):
        log.warning("another node was stopped by %s; this agent, run from Python, leaves stopping "
                    "to its caller", _signal_name(signum))

    def check(self):
        pass

    def requested(self):
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class _RankAssignment:
    """Where this node's workers sit in the job for one round: a value, made once per round from
    every node's (role, local world size) in group-rank order."""

    def __init__(self, peers, group_rank, role, master_addr, master_port):
        before = peers[:group_rank]
        self.group_rank, self.group_world_size = group_rank, len(peers)
        self.local_world_size = peers[group_rank][1]
        self.base_rank = sum(n for _, n in before)
        self.world_size = sum(n for _, n in peers)
        self.role_base = sum(n for r, n in before if r == role)
        self.role_world_size = sum(n for r, n in peers if r == role)
        self.master_addr, self.master_port = master_addr, master_port

    def env(self, local_rank, role):
        """The rank variables of one worker."""
        return {
            "LOCAL_RANK": str(local_rank),
            "RANK": str(self.base_rank + local_rank),
            "GROUP_RANK": str(self.group_rank),
            "ROLE_RANK": str(self.role_base + local_rank),
            "ROLE_NAME": role,
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "WORLD_SIZE": str(self.world_size),
            "GROUP_WORLD_SIZE": str(self.group_world_size),
            "ROLE_WORLD_SIZE": str(self.role_world_size),
            "MASTER_ADDR": str(self.master_addr),
            "MASTER_PORT": str(self.master_port),
        }


_SUCCESS, _FAILURE, _PEER_FAILURE, _MEMBERSHIP, _BROKEN, _STORE_LOST = (
    "success", "failure", "peer failure", "nodes waiting", "member lost", "store lost")

# How long the node serving the store waits, beyond the grace period, for every member to have
# seen the job's failure before it leaves (and the store with it).
_OUTCOME_WAIT = 30.0

# The agent's states and the only moves between them (see LocalElasticAgent._set_state).
_TRANSITIONS = {
    WorkerState.UNKNOWN: (WorkerState.INIT,),                          # run() begins
    WorkerState.INIT: (WorkerState.HEALTHY,                            # workers started
                       WorkerState.SUCCEEDED,                          # the run was closed: done
                       WorkerState.STOPPED, WorkerState.FAILED),
    WorkerState.HEALTHY: (WorkerState.SUCCEEDED,                       # every worker exited 0
                          WorkerState.UNHEALTHY,                       # a failure or a membership change
                          WorkerState.STOPPED, WorkerState.FAILED),
    WorkerState.UNHEALTHY: (WorkerState.INIT,                          # restart: rendezvous again
                            WorkerState.FAILED,                        # restart budget spent
                            WorkerState.STOPPED),
    WorkerState.SUCCEEDED: (WorkerState.STOPPED,                       # a stop signal in the exit barrier
                            WorkerState.FAILED,                        # another node gave up meanwhile
                            WorkerState.INIT),                         # run() again
    WorkerState.FAILED: (WorkerState.INIT,),
    WorkerState.STOPPED: (WorkerState.INIT,),
}


class LocalElasticAgent:
    """Runs a WorkerSpec's workers on this node through rendezvous rounds, restarts and teardown.

    It keeps only the policy loop: rendezvous, start a worker group, monitor it, then restart, stop
    or finish. `run()` returns a RunResult (the whole outcome: state, return values, every failure
    of the last attempt across the job, the root cause); it raises only for a stop signal (the
    workers are torn down first) or a rendezvous error (no workers left behind either).

    ``fork_server``: a ``_ForkServer`` forked before the caller started threads; Python-script workers
    (an entrypoint from ``python_command``) are then forked from it. ``stop_flag``: a ``_StopFlag``
    whose handler the caller installed for the signals it wants to end the run; None leaves signals
    to the caller. ``adopt_orphans``: for a process that runs nothing but the agent (the launcher):
    it becomes the subreaper of its callable workers' descendants, and teardown kills every process
    below it except its own helpers, also one a worker forked without exec that left its group.
    ``stack_signal``: the signal Python workers dump their stacks on (see Stacks); None for the
    default (SIGRTMIN+6), 0 for no dumps. ``event_log``: a path for the event log (JSON lines, see
    the module docstring), True for ``events.jsonl`` in the run's log folder, None for none (the
    events are still narrated)."""

    def __init__(self, spec, *, logs_specs=None, start_method="spawn", exit_barrier_timeout=300,
                 shutdown_timeout=30, log_line_prefix_template=None, health_check_port=None,
                 fork_server=None, stop_flag=None, adopt_orphans=False, stack_signal=None, event_log=None):
        if start_method not in ("spawn", "fork", "forkserver"):
            raise ValueError("start_method must be spawn, fork or forkserver, got %r" % (start_method,))
        self._spec = spec
        self._logs = logs_specs or DefaultLogsSpecs()
        self._exit_barrier_timeout = float(exit_barrier_timeout)
        self._shutdown_timeout = float(shutdown_timeout)
        self._handler = spec.rdzv_handler or _LocalRendezvous(addr=spec.local_addr)
        self._stop = stop_flag or _NoStop()
        self._stacks_trigger, worker_stack_signal = _stack_signals(stack_signal, spec)
        self._setup = _WorkerSetup(spec, self._logs, log_line_prefix_template or _DEFAULT_PREFIX_TEMPLATE,
                                   _starter(spec, start_method, fork_server, adopt_orphans), worker_stack_signal)
        self._control = None       # _NodeControl while run() runs
        self._state = WorkerState.UNKNOWN
        self._group = None         # _WorkerGroup of the running attempt
        self._ranks = None         # _RankAssignment of the current round
        self._peers = None         # _Peers of the current round
        self._reaper = None
        self._attempt = 0
        self._restart_count = 0
        self._servers = _NodeServers(health_check_port)
        self._run_started = self._run_ended = None   # time.monotonic() of run()'s start and end
        self._event_log = event_log
        self._events = _Events()   # run() opens the event log; narration only until then
        self._job_restarts = 0     # the most restarts any member of the round has made
        self._nodes = None         # node count of the last round
        self._exits_told = set()   # (attempt, rank) whose worker_exited event was emitted
        self._workers_started = 0
        self._restarting = None    # (why, failure time, detected, stopped) of a restart under way
        self._rdzv_done = None     # when the last round completed (time.time())
        self.last_progress_time = time.time()

    # -- what /healthz and callers read --------------------------------------------------------------

    @property
    def state(self):
        return self._state

    @property
    def restart_count(self):
        return self._restart_count

    @property
    def group_rank(self):
        return None if self._ranks is None else self._ranks.group_rank

    @property
    def group_world_size(self):
        return None if self._ranks is None else self._ranks.group_world_size

    @property
    def world_size(self):
        return None if self._ranks is None else self._ranks.world_size

    def get_worker_group(self, role=None):
        """torch's view of this node's worker group: ``spec``, ``state``, ``group_rank``,
        ``group_world_size``, ``master_addr``, ``master_port`` (a snapshot; None before a round)."""
        ranks = self._ranks
        master = (None, None) if ranks is None else (ranks.master_addr, ranks.master_port)
        return WorkerGroup(self._spec, self._state, self.group_rank, self.group_world_size, *master)

    # torch's agent attribute names, for scripts written against it
    @property
    def _remaining_restarts(self):
        return self._spec.max_restarts - self._restart_count

    @property
    def _total_execution_time(self):
        """Seconds the last run() took (so far, while it runs)."""
        if self._run_started is None:
            return 0.0
        return (self._run_ended or time.monotonic()) - self._run_started

    def _set_state(self, new):
        """The one place the state changes; a move not in _TRANSITIONS is a bug, said loudly."""
        if new not in _TRANSITIONS[self._state]:
            raise RuntimeError("agent state %s -> %s is not a documented transition" % (self._state, new))
        log.debug("state %s -> %s", self._state, new)
        self._state = new

    # -- run -----------------------------------------------------------------------------------------

    def run(self):
        self._run_started, self._run_ended = time.monotonic(), None
        self._set_state(WorkerState.INIT)
        tree_token = _new_tree_token()   # marks every worker's tree in its environment
        self._reaper = _Reaper(tree_token)
        run_id = _run_id_of(self._handler)
        self._logs._make_root(run_id)
        began = time.monotonic()
        path = _event_log_file(self._event_log, self._logs.root_log_dir)
        self._events = _Events(path, run_id)
        self._events.emit("start", **_start_fields(self._handler, self._spec, self._logs.root_log_dir, path))
        self._exits_told, self._workers_started, self._restarting, self._nodes = set(), 0, None, None
        exit_fields = {"code": 1}
        self._control = _NodeControl(self._handler, self._stop, run_id, self._stacks_trigger,
                                     lambda: self._group, self)
        try:
            self._servers.start(self._logs.root_log_dir, run_id, _health_status_fn(self))
            self._setup.begin(run_id, tree_token, self._reaper, self._servers.timer)
            self._control.start()
            result = self._run_loop()
            if self._group is not None:
                result.outlived_grace = dict(self._group.outlived_grace)
            exit_fields = _exit_fields(result=result)
            return result
        except _SignalStop as e:
            exit_fields = _exit_fields(error=e)
            self._events.emit("stop_signal", signal=_signal_name(e.signum))
            self._set_state(WorkerState.STOPPED)
            self._stop_group(e.signum)
            self._control.wait_stop_seen()
            raise
        except BaseException as e:
            exit_fields = _exit_fields(error=e)
            if self._state not in (WorkerState.SUCCEEDED, WorkerState.FAILED, WorkerState.STOPPED):
                self._set_state(WorkerState.FAILED)
            raise
        finally:
            self._stop_group(signal.SIGTERM)
            self._servers.stop()
            self._control.close()
            self._reaper.close(clean=True)
            try:
                self._handler.shutdown()
            except Exception as e:  # never let a leaving-the-run error hide the outcome
                log.debug("rendezvous shutdown: %s", e)
            self._events.emit("exit", state=self._state, restarts=self._job_restarts,
                              workers_started=self._workers_started,
                              elapsed=round(time.monotonic() - began, 3), **exit_fields)
            self._events.close()
            if self._state == WorkerState.SUCCEEDED and not (path and os.path.dirname(path) == self._logs.root_log_dir):
                self._logs._cleanup()
            self._run_ended = time.monotonic()

    def _run_loop(self):
        spec = self._spec
        while True:
            try:
                self._rendezvous()
            except _rdzv.RendezvousClosedError as e:
                if getattr(e, "late", False):
                    raise    # not this job's end: a reused run id
                return self._closed_by_another_node()
            self._stop.check()
            self._start_group()
            outcome, failures = self._monitor()
            detected = time.time()
            if outcome == _SUCCESS:
                return self._succeeded()
            if outcome == _STORE_LOST:
                # the outcome lives in the store: without it this node cannot know whether the job
                # failed, so it must not carry on and report a success of its own
                self._set_state(WorkerState.FAILED)
                self._stop_group(signal.SIGTERM)
                raise _rdzv.RendezvousConnectionError(
                    "lost the store mid-run: %s; this node's workers were stopped" % failures)
            self._tell_exits(failures)
            self._set_state(WorkerState.UNHEALTHY)
            if outcome == _BROKEN:
                self._events.emit("node_lost", round=self._peers.round, reason=self._peers.broken_reason())
            self._stop_group(signal.SIGTERM)
            if outcome in (_MEMBERSHIP, _BROKEN):
                self._events.emit("restart", why=outcome, count=self._job_restarts, max=spec.max_restarts)
                self._restarting = (outcome, detected, detected, time.time())
                continue
            # a failure here or on a peer
            job = self._peers.failures(failures)
            root_rank, root = _first(job)
            self._events.emit("failure", **_failure_fields(root_rank, root, len(job)))
            if self._restart_count < spec.max_restarts:
                _count_root_cause(self._handler, self._ranks, root_rank, root)   # raises: leave the job
                self._restart_count += 1
                self._job_restarts = max(self._job_restarts + 1, self._restart_count)
                self._events.emit("restart", why=outcome, count=self._job_restarts, max=spec.max_restarts,
                                  rank=root_rank)
                # a peer's clock may run ahead of ours: a failure is never seen before it happened
                self._restarting = (outcome, min(root.exit_time, detected), detected, time.time())
                continue
            self._set_state(WorkerState.FAILED)
            self._peers.give_up()
            self._events.emit("gave_up", max=spec.max_restarts)
            return RunResult(WorkerState.FAILED, failures=job, root_cause=(root_rank, root),
                             restart_count=self._job_restarts)

    def _tell_exits(self, first=()):
        """worker_exited for every exit of the attempt not yet told, those of `first` first."""
        if self._group is not None:
            self._events.emit_all("worker_exited", _untold_exits(self._group, self._attempt - 1,
                                                                 self._exits_told, first))

    def _succeeded(self):
        """Every worker exited 0: the exit barrier, then success, unless another node gave up
        meanwhile (then the job failed, here too)."""
        values = self._group.return_values()
        self._set_state(WorkerState.SUCCEEDED)
        self._stop_group(signal.SIGTERM)
        self._events.emit("succeeded", workers=len(values))
        if self._peers.exit_barrier(self._exit_barrier_timeout):
            return RunResult(WorkerState.SUCCEEDED, return_values=values, restart_count=self._job_restarts)
        return self._failed_elsewhere(self._peers.give_up, "another node failed for good while this node "
                                      "waited at the exit barrier")

    def _closed_by_another_node(self):
        """The run was closed: the job's end, a success unless a node gave up while this one was
        between rounds (then its last round's store names the root cause)."""
        if self._peers is not None and self._peers.failed_for_good():
            return self._failed_elsewhere(self._peers.outcome_seen,
                                          "the run was closed by another node after the job failed")
        log.info("the run was closed by another node; nothing left to do here")
        self._set_state(WorkerState.SUCCEEDED)
        return RunResult(WorkerState.SUCCEEDED, restart_count=self._job_restarts)

    def _failed_elsewhere(self, acknowledge, why):
        """Another node gave up on the job: it failed here too, with the job's failures as that
        node published them; `acknowledge()` tells the others this node knows."""
        self._set_state(WorkerState.FAILED)
        job = self._peers.failures({})
        acknowledge()
        log.info("%s", why)
        return RunResult(WorkerState.FAILED, failures=job, root_cause=_first(job),
                         restart_count=self._job_restarts)

    def _rendezvous(self):
        spec = self._spec
        if self._state != WorkerState.INIT:
            self._set_state(WorkerState.INIT)
        why = "start" if self._restarting is None else self._restarting[0]
        self._events.emit("rendezvous", why=why)
        began = time.monotonic()
        with self._stop:
            info = self._handler.next_rendezvous()
        self._peers = _Peers(info, self._handler, self._stop, _run_id_of(self._handler),
                             self._shutdown_timeout + _OUTCOME_WAIT)
        record = _agent_record(spec, self._job_restarts, self._logs.root_log_dir, self._events.path)
        peers = _share_roles(info, spec.role, spec.local_world_size, record)
        if info.world_size > 1:
            self._job_restarts = max([self._job_restarts] + _restarts_of(info.store, info.world_size))
        r = self._ranks = _RankAssignment(peers, info.rank, spec.role, spec.master_addr or info.master_addr,
                                          spec.master_port or info.master_port)
        if self._nodes is not None and self._nodes != info.world_size:
            self._events.emit("scale_change", from_nodes=self._nodes, to_nodes=info.world_size)
        self._nodes = info.world_size
        self._events.emit("round", **_round_fields(info, r, peers, spec.local_addr, time.monotonic() - began))
        self._rdzv_done = time.time()

    def _start_group(self):
        self._group = self._setup.group(self._attempt, self._ranks, self._restart_count)
        workers = self._group.workers
        self._attempt += 1
        # a stop signal is answered between two workers, not after the last of many
        self._group.start(stopping=self._stop.requested)
        self._stop.check()   # every worker asked for is known now, so teardown finds them all
        self._set_state(WorkerState.HEALTHY)
        self.last_progress_time = time.time()
        self._workers_started += len(workers)
        now = time.time()
        self._events.emit_all("worker_started", _started(workers, self._attempt - 1))
        if self._restarting is not None:
            self._events.emit("restarted", **_restarted_fields(self._restarting, self._rdzv_done, now))
            self._restarting = None

    def _stop_group(self, sig):
        if self._group is not None:
            self._group.stop(sig, self._shutdown_timeout, self._events, self._stop)
            self._tell_exits()

    # -- monitor -------------------------------------------------------------------------------------

    def _monitor(self):
        """Wait until the group succeeds or something calls for a stop; returns (outcome, failures)."""
        interval = self._spec.monitor_interval
        # a one-node round still watches for joiners (scale-up); only our own local round has none
        multi = not isinstance(self._handler, _LocalRendezvous)
        next_check = time.monotonic() + interval
        while True:
            self._stop.check()
            done, failed = self._group.wait(max(0.0, next_check - time.monotonic()), self._stop)
            if failed:
                return _FAILURE, self._group.failures(failed, self._spec.role)
            if done == len(self._group.workers):
                return _SUCCESS, {}
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + interval
                self.last_progress_time = time.time()
                if multi:
                    try:
                        outcome = self._peers.check()
                    except Exception as e:  # the store is gone, and the job's outcome with it
                        log.error("lost the store: %s; stopping this node's workers", e)
                        return _STORE_LOST, e
                    if outcome is not None:
                        return outcome, {}


class _NodeServers:
    """What an agent serves beside its workers while run() runs: the file timer (when the environment
    asks for it) and /healthz (with a port)."""

    def __init__(self, health_port=None):
        self._health_port = health_port
        self.timer = None    # FileTimerServer
        self.health = None   # _HealthServer

    def start(self, log_dir, run_id, status_fn):
        self.timer = _serve_file_timer(_file_timer_path(os.environ, log_dir), run_id)
        if self._health_port is not None:
            self.health = _serve_health(self._health_port, status_fn)

    def stop(self):
        for name in ("health", "timer"):
            server = getattr(self, name)
            setattr(self, name, None)
            if server is not None:
                try:
                    server.stop()
                except Exception as e:  # never let a server's stop hide the run's outcome
                    log.debug("stopping %s: %s", name, e)


def _run_id_of(handler):
    """The handler's run id ("none" for one that cannot say)."""
    try:
        return handler.get_run_id()
    except Exception:
        return "none"


def _agent_record(spec, restarts, log_dir, event_log):
    """What `elasticrun status` shows of a node."""
    import json
    return json.dumps({"host": _hostname(), "pid": os.getpid(), "restarts": restarts,
                       "max_restarts": spec.max_restarts, "nproc": spec.local_world_size,
                       "log_dir": log_dir, "event_log": event_log})


def _share_roles(info, role, local_world_size, record):
    """Every node's (role, worker count) in group-rank order, the ranks' ground: this node's are
    published on the round's store beside its `record` (what `elasticrun status` shows of it), then
    all are read back. A one-node round needs no store."""
    if info.world_size <= 1:
        return [(role, local_world_size)]
    info.store.multi_set(["agent/%d" % info.rank, "role/%d" % info.rank],
                         [record, "%s\n%d" % (role, local_world_size)])
    values = info.store.multi_get(["role/%d" % r for r in range(info.world_size)])
    return [(r, int(n)) for r, n in (v.decode().split("\n") for v in values)]


def _serve_file_timer(path, run_id):
    """A started FileTimerServer at `path`, or None when `path` is None (the timer is off)."""
    if path is None:
        return None
    timer = FileTimerServer(path, run_id=run_id)
    timer.set_worker_pids(())  # no workers yet: nobody may be signalled
    try:
        timer.start()
    except _TimerFileBusy:
        raise
    except (OSError, ValueError) as e:
        raise ElasticError("cannot serve the file timer at %s: %s" % (path, e)) from e
    return timer


def _serve_health(port, status_fn):
    """A started /healthz server on `port`."""
    health = _HealthServer(port, status_fn)
    try:
        health.start()
    except OSError as e:
        raise ElasticError("cannot serve the health check on port %s: %s" % (port, e.strerror or e)) from e
    return health


def _restarts_of(store, world_size):
    """The restart counts the round's agents published (agent/<group rank>; older agents publish none)."""
    import json
    keys = ["agent/%d" % r for r in range(world_size)]
    keys = [k for k in keys if store.check([k])]
    counts = []
    for value in store.multi_get(keys) if keys else []:
        try:
            counts.append(int(json.loads(value.decode())["restarts"]))
        except (ValueError, KeyError, TypeError):
            pass
    return counts


def _count_root_cause(handler, ranks, root_rank, root):
    """A failure caused by this node's own worker counts against the node: with exclusion on
    (``--rdzv-conf exclude_after=K``) the handler raises RendezvousExcludedError at the K-th, and
    the node leaves the job instead of restarting (its workers are stopped already)."""
    note = getattr(handler, "note_root_cause", None)
    if note is None or not ranks.base_rank <= root_rank < ranks.base_rank + ranks.local_world_size:
        return
    note("rank %d exited: %s" % (root_rank, root.message))


def _failure_fields(rank, f, count):
    """The failure event's fields for the root cause `f` (global rank `rank`) of `count` failures."""
    return {"rank": rank, "local_rank": f.local_rank, "failure_host": f.host, "pid": f.pid,
            "code": f.exitcode if f.exitcode is None or f.exitcode >= 0 else None,
            "signal": f.signal_name() or None, "message": f.message, "failure_time": f.exit_time,
            "error_file": f.error_file if f.error_file_data is not None else None,
            "stderr_log": f.stderr_log, "failures": count}


class _Peers:
    """The rest of the job for one round, through the round's store: their failures, joiners and
    lost members, the failure exchange, and the exit barrier. A one-node round has no peers."""

    def __init__(self, info, handler, stop, run_id, outcome_wait):
        self._info, self._handler, self._stop = info, handler, stop
        self._failed_key = "elasticrun/%s/failed" % run_id   # on the handler's store: outlives rounds
        self._outcome_wait = outcome_wait
        self.round = getattr(info, "round", None)

    def check(self):
        """One look: a peer's failure, nodes waiting, a member lost; None when all is well."""
        store = self._info.store
        if self._info.world_size > 1 and store.check(["failed"]):
            return _PEER_FAILURE
        if self._handler.num_nodes_waiting() > 0:
            # the survivors of a dead member wait for the next round too: that is not a scale-up
            return _BROKEN if self._broken_in_store() else _MEMBERSHIP
        # a member that finished and left after its exit barrier timed out said so (finished()):
        # it does not break the round
        broken = getattr(self._handler, "round_broken", None)
        if broken is not None and broken():
            return _BROKEN
        return None

    def _broken_in_store(self):
        ask = getattr(self._handler, "broken_reason", None)
        try:
            return ask is not None and ask() is not None
        except Exception:
            return False

    def broken_reason(self):
        """Why the round broke, as the rendezvous says it (it names the lost member's host)."""
        ask = getattr(self._handler, "broken_reason", None)
        try:
            why = ask() if ask is not None else None
        except Exception as e:
            why = "the store is unreachable (%s)" % e
        return "a member died or left" if why is None else why

    def failures(self, local):
        """Failures of the whole job for this round: ours published, then everyone's read back.
        Without the store, what this node knows."""
        import json
        info = self._info
        store = info.store
        try:
            if local:   # published on a one-node round too: `elasticrun status` reads it
                store.set("failure/%d" % info.rank, json.dumps(
                    {str(r): f._to_dict() for r, f in local.items()}))
                store.add("failed", 1)
            if info.world_size <= 1:
                return local
            job = dict(local)
            for r in range(info.world_size):
                key = "failure/%d" % r
                if r != info.rank and store.check([key]):
                    for rank, d in json.loads(store.get(key).decode()).items():
                        job[int(rank)] = ProcessFailure._from_dict(d)
        except Exception as e:  # the store may be gone with its host: report what we know
            log.warning("could not exchange failures with the other nodes: %s", e)
            return local or {-1: ProcessFailure(-1, None, 1, message="a peer failed: %s" % e)}
        return job or {-1: ProcessFailure(-1, None, 1, message="another node reported a failure")}

    def give_up(self):
        """Final failure: release the exit barrier of nodes that finished, close the run, and say
        this node has seen the outcome; the node serving the store then waits (bounded) until every
        member has said so, for leaving takes the store, and the outcome, away from the others."""
        if self._info.world_size > 1:
            try:
                self._info.store.set("exit/release", "failed")
                self._handler.store.set(self._failed_key, "1")   # read by nodes between rounds
            except Exception as e:
                log.debug("could not release the exit barrier: %s", e)
        try:
            self._handler.set_closed()
        except Exception as e:
            log.debug("could not close the run: %s", e)
        self.outcome_seen()

    def failed_for_good(self):
        """Whether a node gave up on this run (it writes that before it closes the run)."""
        store = getattr(self._handler, "store", None)
        try:
            return store is not None and store.check([self._failed_key])
        except Exception as e:
            log.debug("could not read the run's outcome: %s", e)
            return False

    def outcome_seen(self):
        """Count this node among those that know the job failed; the node serving the store waits
        (up to outcome_wait seconds) for them all."""
        info = self._info
        if info.world_size <= 1:
            return
        store = info.store
        try:
            if store.add("exit/seen", 1) >= info.world_size:
                store.set("exit/all_seen", "1")
            if getattr(self._handler, "hosts_store", False):
                self._wait_all_seen(store, info.world_size)
        except _SignalStop:
            raise
        except Exception as e:
            log.warning("not every node acknowledged the failure: %s", e)

    def _wait_all_seen(self, store, nodes):
        deadline = time.monotonic() + self._outcome_wait
        pace = _store._Pace()
        while not store.check(["exit/all_seen"]):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("leaving with the store after %d of %d nodes saw the failure",
                            store.add("exit/seen", 0), nodes)
                return
            if pace.due():
                log.info("keeping the store up until every node has seen the failure: "
                         "%d of %d have (%d s left)", store.add("exit/seen", 0), nodes, round(left))
            try:
                with self._stop:
                    store.wait(["exit/all_seen"], min(left, 1.0))
            except _store.StoreTimeout:
                pass

    def _wait_release(self, store, deadline, nodes):
        """Wait for the exit barrier's release until `deadline` (StoreTimeout then), saying at a
        human pace how many nodes have finished."""
        pace = _store._Pace()
        while True:
            left = deadline - time.monotonic()
            try:
                with self._stop:
                    store.wait(["exit/release"], max(0.001, min(left, 1.0)))
                return
            except _store.StoreTimeout:
                if left <= 1.0:
                    raise
            if pace.due():
                log.info("exit barrier: waiting for the other nodes to finish: %d of %d done (%d s left)",
                         store.add("exit/count", 0), nodes, round(deadline - time.monotonic()))

    def exit_barrier(self, timeout):
        """Wait up to `timeout` seconds for every node to finish; False when one of them failed for
        good meanwhile. When the wait runs out a node leaves, its departure marked as finished (the
        others see no lost member and carry on), except the node serving the store: leaving would
        take the store from the nodes still running, so it waits until they are done or lost."""
        info = self._info
        if info.world_size <= 1:
            try:   # the job's end: a run id reused later is refused, as after a job of many nodes
                self._handler.set_closed()
            except Exception as e:
                log.warning("could not close the run: %s (the workers of this node succeeded)", e)
            return True
        store = info.store
        start = time.monotonic()
        try:
            store.set("exit/done/%d" % info.rank, "1")   # named before counted: see _still_running
            if store.add("exit/count", 1) >= info.world_size:
                store.set("exit/release", "done")
            try:
                self._wait_release(store, start + timeout, info.world_size)
            except _store.StoreTimeout:
                if not getattr(self._handler, "hosts_store", False):
                    self._leave_finished(store, timeout)
                    return True
                if not self._keep_serving(store, timeout):
                    return True
            release = store.get("exit/release")
            if release == b"done":
                self._handler.set_closed()
                self._finished()    # leaving now is the job's end, not a lost member
            log.debug("exit barrier passed in %.3f s", time.monotonic() - start)
            return release != b"failed"
        except _SignalStop:
            raise
        except Exception as e:  # a barrier problem never fails a successful node
            log.warning("exit barrier: %s (the workers of this node succeeded)", e)
        return True

    def _leave_finished(self, store, timeout):
        """A node that is not the store's host leaves after its exit-barrier timeout (as torch's
        agent does), first telling the round it is done, not lost."""
        running = self._still_running(store)
        log.warning("exit barrier: %s still running after %g s; leaving (the workers of this node "
                    "succeeded)", self._nodes_named(running), timeout)
        self._finished()

    def _finished(self):
        """Tell the round this node is done, so its leaving is no lost member for the others."""
        finished = getattr(self._handler, "finished", None)
        if finished is not None:
            finished()

    def _keep_serving(self, store, timeout):
        """The store host after its exit-barrier timeout: it stays until the barrier is released
        (every node done, or one failed for good; True) or a member is lost (False), for the nodes
        still running would lose the store and stop as "lost the store". A stop signal still ends
        the wait."""
        broken = getattr(self._handler, "round_broken", None)
        pace = _store._Pace()
        log.info("exit barrier: %s still running after %g s; this node serves the store and stays "
                 "until they are done (leaving would stop them)", self._nodes_named(self._still_running(store)),
                 timeout)
        while not store.check(["exit/release"]):
            if broken is not None and broken():
                log.warning("exit barrier: %s; leaving with the store", self.broken_reason())
                return False
            if pace.due():
                log.info("keeping the store up for %s: waiting", self._nodes_named(self._still_running(store)))
            try:
                with self._stop:
                    store.wait(["exit/release"], 1.0)
            except _store.StoreTimeout:
                pass
        return True

    def _still_running(self, store):
        """Group ranks of the nodes that have not reached the exit barrier."""
        return [r for r in range(self._info.world_size) if not store.check(["exit/done/%d" % r])]

    def _nodes_named(self, ranks, most=8):
        """'1 node (gpu07)', '3 nodes (gpu01, gpu02, gpu03)', at most `most` names."""
        members = getattr(self._info, "members", None) or []
        names = []
        for r in ranks[:most]:
            m = members[r] if r < len(members) else None
            names.append("rank %d" % r if m is None else (m[2] if len(m) > 2 and m[2] else m[0]))
        more = ", ..." if len(ranks) > most else ""
        return "%d node%s (%s%s)" % (len(ranks), "" if len(ranks) == 1 else "s", ", ".join(names), more)


# ------------------------------------------------------------------------------------------- Stacks
# Where a worker is: faulthandler's dump of all its threads, asked for with the stack signal.

_STACK_FILE_VAR = "ELASTICRUN_STACK_FILE"
_STACK_SIGNAL_VAR = "ELASTICRUN_STACK_SIGNAL"
_STACK_WAIT = 1.0       # seconds the agent waits for the dumps it asked for
_NOT_PYTHON = "not a Python worker: no stack"


def _default_stack_signal():
    """SIGRTMIN+6 where real-time signals exist, else None (no dumps). Not SIGUSR1/SIGUSR2: Slurm's
    ``--signal`` and many training scripts use those for checkpointing; not SIGQUIT or SIGABRT:
    their default action dumps core; a real-time signal nobody else sends is free."""
    low = getattr(signal, "SIGRTMIN", None)
    return None if low is None else int(low) + 6


def _stack_signals(stack_signal, spec):
    """(the signal that asks the agent for the job's stacks, the one `spec`'s workers dump theirs on)
    from the agent's ``stack_signal`` (None: the default; 0: none); a program worker gets none."""
    if stack_signal is None:
        stack_signal = _default_stack_signal()
    return stack_signal or None, stack_signal if stack_signal and _is_python_spec(spec) else None


def _parse_stack_signal(text):
    """ELASTICRUN_STACK_SIGNAL's value: a name (SIGUSR2), SIGRTMIN+N, a number; 0, off or none: no
    dumps. ValueError with a sentence otherwise."""
    t = text.strip().upper()
    if t in ("", "0", "OFF", "NONE"):
        return None
    low, high = getattr(signal, "SIGRTMIN", None), getattr(signal, "SIGRTMAX", None)
    try:
        if t.isdigit():
            n = int(t)
        elif t.startswith("SIGRTMIN") and low is not None:
            n = int(low) + int(t[len("SIGRTMIN"):] or 0)
        else:
            n = int(getattr(signal, t if t.startswith("SIG") else "SIG" + t))
    except (AttributeError, ValueError):
        n = -1
    if n in (signal.SIGKILL, signal.SIGSTOP) or not 0 < n < signal.NSIG or (
            high is not None and n > int(high)):
        raise ValueError("ELASTICRUN_STACK_SIGNAL=%r is not a signal a worker can catch" % text)
    return n


def _stack_signal_name(sig):
    low = getattr(signal, "SIGRTMIN", None)
    if low is not None and sig is not None and sig >= int(low) and sig not in set(signal.Signals):
        return "SIGRTMIN+%d" % (sig - int(low))
    return _signal_name(sig)


def _ask_stacks(workers):
    """Ask every live Python worker of `workers` for its stack at once, then wait (up to _STACK_WAIT
    seconds in all) until each dump has stopped growing. Returns {worker: its dump, or a sentence
    saying why there is none}. One caller at a time per worker (see _WorkerGroup.stacks)."""
    asked, stacks = {}, {}
    for w in workers:
        if w.stack_file is None:
            stacks[w] = _NOT_PYTHON
            continue
        try:
            size = os.stat(w.stack_file).st_size
            sig = int(w.env[_STACK_SIGNAL_VAR])
        except (OSError, KeyError, ValueError):
            stacks[w] = "no stack: the worker had not armed its stack dump yet"
            continue
        try:
            os.kill(w.pid, sig)   # the worker alone: its own children may never have armed
        except OSError:
            stacks[w] = "no stack: the worker is gone"
            continue
        asked[w] = [size, size]   # where its dump starts, its size at the last look
    deadline = time.monotonic() + _STACK_WAIT
    while asked:
        time.sleep(0.01)   # faulthandler writes from a signal handler: no event to wait on
        for w, seen in list(asked.items()):
            try:
                size = os.stat(w.stack_file).st_size
            except OSError:
                size = seen[1]
            if size > seen[0] and size == seen[1]:   # a dump that did not grow for 10 ms
                stacks[w] = _trim_dump(_read_dump(w.stack_file, seen[0], size))
                if stacks[w].endswith("\n"):
                    del asked[w]
                    continue
            seen[1] = size
        if time.monotonic() >= deadline:
            for w, seen in asked.items():
                stacks[w] = _trim_dump(_read_dump(w.stack_file, seen[0], seen[1])) if seen[1] > seen[0] else (
                    "no stack: the worker wrote none within %g s" % _STACK_WAIT)
            break
    return stacks


def _read_dump(path, start, end):
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(min(end - start, 1 << 20)).decode("utf-8", "replace")
    except OSError:
        return ""


def _trim_dump(text):
    """A dump without the launcher's own frames below the script (the fork server's, the
    bootstrap's): they are the same in every worker and say nothing."""
    ours = (__file__, "<string>", "<elasticrun>")
    blocks = []
    for block in text.rstrip("\n").split("\n\n"):
        lines = block.split("\n")
        while len(lines) > 2 and any(lines[-1].strip().startswith('File "%s"' % o) for o in ours):
            lines.pop()
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _stack_site(stack):
    """Where a dump says the main thread was: "in stuck_here (train.py:12)"; the main thread is
    the last one faulthandler lists, and its innermost frame comes first."""
    import re
    if not stack:
        return "no stack"
    blocks = [b for b in stack.split("\n\n") if 'File "' in b]
    if not blocks:
        return stack.strip().split("\n")[0]
    m = re.search(r'File "(.*)", line (\d+) in (\S+)', blocks[-1])
    if m is None:
        return "no stack"
    return "in %s (%s:%s)" % (m.group(3), os.path.basename(m.group(1)), m.group(2))


def _write_stack_error(w, message):
    """The error file of a worker the agent is killing, written for it when it wrote none (a
    SIGKILL leaves no time to), with its stack in extraInfo; returns the data written, or None."""
    if not w.error_file or os.path.exists(w.error_file):
        return None
    data = {"message": {"message": message, "extraInfo": {
        "py_callstack": "", "stack": w.stack or "", "timestamp": str(int(time.time()))}}}
    try:
        _write_json_atomic(w.error_file, data)
    except OSError as e:
        log.debug("could not write %s: %s", w.error_file, e)
        return None
    return data


# -------------------------------------------------------------------------------------- Job control
# One channel for what concerns every node at once: a stop signal, a signal to forward, a request
# for stacks. Events are numbered keys on the rendezvous handler's store (it outlives rounds)::
#
#     any agent / `elasticrun stacks`           every agent (a watcher thread, its own connection)
#       n = add(ctl/count, 1)                     parked in wait([ctl/<next>]) -- no traffic while idle
#       set(ctl/<n>, "<kind> <origin> <arg>") --> get(ctl/<next>); act; next += 1
#                                                 stacks: add(ctl/stacks/<n>/count, 1) -> k,
#                                                         set(ctl/stacks/<n>/<k>, {node's stacks})
#
# kinds: "stop N" (a stop signal reached the origin: stop the same way), "signal N" (forward N to
# the workers, nothing stops), "stacks -" (answer with every worker's stack).

_CONTROL_WAIT = 30.0    # seconds a watcher's parked wait lasts before it is renewed (one request)
_FORWARD_WINDOW = 2.0   # a signal forwarded within this many seconds is not forwarded again
_STACKS_TIMEOUT = 10.0  # seconds `elasticrun stacks` waits for every node's answer
_STOP_SEEN_WAIT = 5.0   # seconds the store's node, stopping, waits for every node to hear of it


def _control_prefix(run_id):
    return "elasticrun/%s/ctl/" % run_id


def _publish_event(store, prefix, kind, origin, arg):
    """Append one event; returns its number."""
    n = int(store.add(prefix + "count", 1))
    store.set(prefix + str(n), "%s %s %s" % (kind, origin, arg))
    return n


class _JobControl:
    """An agent's end of the job's control channel: a watcher thread that acts on every event after
    the ones that existed when it started, and a publisher thread fed by ``publish()`` (a queue put,
    so a signal handler may call it). Both use a connection of their own (``store.clone()``, when
    the store has one), which ``close()`` closes to wake the watcher."""

    def __init__(self, store, run_id, on_event):
        import queue
        self._prefix = _control_prefix(run_id)
        self._on_event = on_event           # (n, kind, arg, origin, own) from the watcher thread
        clone = getattr(store, "clone", None)
        self._own = callable(clone)
        self._store = clone() if self._own else store
        if self._own:   # one parked get answers with the event itself: no second round trip
            self._store.set_timeout(_CONTROL_WAIT)
        self.origin = "%s:%d" % (_hostname(), os.getpid())
        self._queue = queue.SimpleQueue()   # reentrant put: safe in a signal handler
        self._closed = False
        self._threads = []
        self._next = None

    def start(self):
        import threading
        self._next = int(self._store.add(self._prefix + "count", 0)) + 1
        for target, name in ((self._watch, "elastic-job-watch"), (self._publish_loop, "elastic-job-publish")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def publish(self, kind, arg):
        """Tell every agent of the job (this one's watcher skips its own stop and signal events)."""
        self._queue.put((kind, arg))

    def in_background(self, fn):
        """Run `fn()` in a thread of its own, started from the publisher (not from a signal handler)."""
        self._queue.put(fn)

    @property
    def store(self):
        return self._store

    def _publish_loop(self):
        import threading
        while True:
            item = self._queue.get()
            if item is None:
                return
            if callable(item):
                threading.Thread(target=item, name="elastic-job-task", daemon=True).start()
                continue
            try:
                _publish_event(self._store, self._prefix, item[0], self.origin, item[1])
            except Exception as e:
                log.warning("could not tell the other nodes (%s %s): %s", item[0], item[1], e)

    def _watch(self):
        while not self._closed:
            key = self._prefix + str(self._next)
            try:
                if not self._own:
                    self._store.wait([key], _CONTROL_WAIT)
                text = self._store.get(key).decode("utf-8", "replace")
            except _store.StoreTimeout:
                continue
            except Exception as e:   # the store is gone: the agent's own checks say so
                if not self._closed:
                    log.debug("job control: %s", e)
                return
            n, self._next = self._next, self._next + 1
            parts = text.split(" ", 2)
            if len(parts) != 3:
                log.warning("job control: ignoring event %d: %r", n, text[:100])
                continue
            kind, origin, arg = parts
            try:
                self._on_event(n, kind, arg, origin, origin == self.origin)
            except Exception as e:
                log.warning("job control: acting on %s from %s: %s", kind, origin, e)

    def close(self):
        """Send what was published, then stop both threads (bounded)."""
        self._closed = True
        self._queue.put(None)
        if len(self._threads) > 1:
            self._threads[1].join(5.0)
        if self._own:
            try:
                self._store.close()
            except Exception as e:
                log.debug("job control: closing: %s", e)
            if self._threads:
                self._threads[0].join(1.0)


class _NodeControl:
    """This node's part in job control, for one run: hears this process's signals through the stop
    flag's listener (a stop, a signal to forward, the stack signal) and the job's events through a
    _JobControl (not on the local rendezvous of an agent without a handler), and acts on the node's
    running workers. ``group()`` is the running _WorkerGroup or None; ``node`` has the agent's
    ``group_rank``, ``group_world_size`` and ``state``."""

    def __init__(self, handler, stop, run_id, stacks_trigger, group, node):
        self._handler, self._stop, self._run_id = handler, stop, run_id
        self._stacks_trigger = stacks_trigger   # this signal to the agent: the job's stacks, logged
        self._group, self._node = group, node
        self._channel = None       # _JobControl once started on a multi-node capable handler
        self._forwarded = {}       # signal -> when it was last forwarded to the workers
        self._stop_acked = False   # this node has counted itself among those that heard of a stop

    def start(self):
        self._stop.listener = self._on_local_signal
        store = getattr(self._handler, "store", None)
        if store is None or isinstance(self._handler, _LocalRendezvous):
            return
        channel = _JobControl(store, self._run_id, self._on_job_event)
        try:
            channel.start()
        except Exception as e:   # the job runs without; the rendezvous will say what is wrong
            log.warning("no job-wide stop, signals or stacks: %s", e)
            channel.close()
            return
        self._channel = channel

    def close(self):
        self._stop.listener = None
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def _nodes(self):
        return self._node.group_world_size or 1

    def _on_local_signal(self, kind, signum):
        """In the signal handler: a stop is told to every node; the stack signal asks the job for its
        stacks; any other signal goes to this node's workers and every other node's."""
        channel = self._channel
        if kind == "stop":
            if channel is not None:
                channel.publish("stop", signum)
        elif signum == self._stacks_trigger:
            if channel is not None:
                channel.in_background(self._log_job_stacks)
        elif self._forward_due(signum):
            self._forward(signum)
            if channel is not None:
                channel.publish("signal", signum)

    def _on_job_event(self, n, kind, arg, origin, own):
        """In the watcher thread: event `n` of the job's control channel."""
        if kind == "stacks":
            self._answer_stacks(n)
            return
        if kind == "stop":
            if not own:
                log.warning("the agent at %s was stopped by %s: stopping this node the same way", origin,
                            _signal_name(int(arg)))
                self._stop.stop_from_job(int(arg))
            self._stop_seen()
            return
        if own:
            return
        signum = int(arg)
        if kind == "signal" and self._forward_due(signum):
            log.info("forwarding %s (sent to the agent at %s) to this node's workers", _signal_name(signum),
                     origin)
            self._forward(signum)

    def _stop_seen(self):
        """Count this node, once, among those that know of the job's stop (see wait_stop_seen)."""
        if self._stop_acked:
            return
        self._stop_acked = True
        prefix = _control_prefix(self._run_id)
        store = self._channel.store
        if int(store.add(prefix + "stop_seen", 1)) >= self._nodes():
            store.set(prefix + "stop_all_seen", "1")

    def wait_stop_seen(self):
        """On the node serving the store, after its own teardown: wait (at most _STOP_SEEN_WAIT
        seconds) until every node has heard of the stop, for leaving takes the store away, and a
        node that loses it first stops as "lost the store" (exit 1) instead of 128+N."""
        channel = self._channel
        if channel is None or not getattr(self._handler, "hosts_store", False) or self._nodes() <= 1:
            return
        key = _control_prefix(self._run_id) + "stop_all_seen"
        try:
            try:
                channel.store.wait([key], 1.0)
            except _store.StoreTimeout:
                log.info("keeping the store up until every node has heard of the stop (%g s at most)",
                         _STOP_SEEN_WAIT - 1.0)
                channel.store.wait([key], _STOP_SEEN_WAIT - 1.0)
        except Exception as e:
            log.warning("leaving with the store before every node heard of the stop: %s", e)

    def _forward_due(self, signum):
        """Once per signal per _FORWARD_WINDOW: under Slurm every agent gets the same signal and
        also hears of it from the others."""
        now, last = time.monotonic(), self._forwarded.get(signum)
        if last is not None and now - last < _FORWARD_WINDOW:
            return False
        self._forwarded[signum] = now
        return True

    def _forward(self, signum):
        """`signum` to each running worker (the worker alone: its children may not expect it)."""
        group = self._group()
        for w in [] if group is None else list(group.workers):
            if w.handle is not None and w.exitcode is None:
                try:
                    os.kill(w.pid, signum)
                except OSError:
                    pass

    def _answer_stacks(self, n):
        import json
        group = self._group()
        workers = [] if group is None else [w for w in group.workers if w.handle is not None]
        stacks = {} if group is None else group.stacks([w for w in workers if w.exitcode is None])
        # an answer stays under 1 MiB however many workers (etcd refuses requests over 1.5 MiB)
        room = max(2048, (1 << 20) // max(1, len(workers)))

        def cut(text):
            return text if len(text) <= room else text[:room] + "\n... (cut at %d characters)\n" % room

        answer = {"host": _hostname(), "pid": os.getpid(), "group_rank": self._node.group_rank,
                  "nodes": self._nodes(), "state": self._node.state,
                  "workers": [{"rank": w.global_rank, "local_rank": w.local_rank, "pid": w.pid,
                               "stack": cut(stacks.get(w) or "exited with code %s" % w.exitcode)}
                              for w in workers]}
        base = "%sstacks/%d/" % (_control_prefix(self._run_id), n)
        store = self._channel.store
        k = int(store.add(base + "count", 1))
        store.set(base + str(k), json.dumps(answer))

    def _log_job_stacks(self):
        channel = self._channel
        if channel is None:
            return
        try:
            answers, nodes = _collect_stacks(channel.store, self._run_id, channel.origin)
        except Exception as e:
            log.warning("could not collect the job's stacks: %s", e)
            return
        log.warning("the job's stacks (asked with %s):\n%s", _stack_signal_name(self._stacks_trigger),
                    _format_stacks(answers, nodes))


def _collect_stacks(store, run_id, origin, timeout=_STACKS_TIMEOUT):
    """Ask every agent of the job `run_id` for its workers' stacks: (answers, nodes), `nodes` the
    job's node count the answers gave (None: nobody answered within `timeout` seconds)."""
    import json
    prefix = _control_prefix(run_id)
    n = _publish_event(store, prefix, "stacks", origin, "-")
    base = "%sstacks/%d/" % (prefix, n)
    deadline = time.monotonic() + timeout
    answers, nodes = [], None
    pace = _store._Pace()
    while nodes is None or len(answers) < nodes:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if pace.due():
            log.info("waiting for the nodes' stacks: %d of %s answered (%d s left)", len(answers),
                     "?" if nodes is None else nodes, round(left))
        key = base + str(len(answers) + 1)
        try:
            store.wait([key], min(left, 1.0))
        except _store.StoreTimeout:
            continue
        answer = json.loads(store.get(key).decode())
        answers.append(answer)
        nodes = max(nodes or 0, int(answer.get("nodes") or 1))
    for k in range(1, len(answers) + 1):   # the store keeps nothing of a request once answered
        try:
            store.delete_key(base + str(k))
        except Exception:
            break
    return answers, nodes


def _rank_ranges(ranks):
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    parts, ranks = [], sorted(ranks)
    start = prev = ranks[0]
    for r in ranks[1:] + [None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(str(start) if start == prev else "%d-%d" % (start, prev))
        start = prev = r
    return ", ".join(parts)


def _format_stacks(answers, nodes):
    """The job's stacks grouped by identical stack, the biggest group first, so the odd rank out
    comes last: "ranks 0-62, 64-127: in all_reduce (x.py:3)" then that stack once."""
    import re
    groups = {}
    for a in answers:
        for w in a.get("workers", ()):
            text = w.get("stack") or "no stack"
            same = re.sub(r"0x[0-9a-fA-F]+", "0x...", text).replace("Current thread", "Thread")
            groups.setdefault(same, []).append(int(w["rank"]))
    lines = []
    for text, ranks in sorted(groups.items(), key=lambda kv: (-len(kv[1]), min(kv[1]))):
        lines.append("%s %s: %s" % ("rank" if len(ranks) == 1 else "ranks", _rank_ranges(ranks), _stack_site(text)))
        if 'File "' in text:
            lines.extend("    " + line for line in text.rstrip("\n").split("\n"))
    idle = ["%s (group rank %s, %s)" % (a.get("host"), a.get("group_rank"), a.get("state"))
            for a in answers if not a.get("workers")]
    if idle:
        lines.append("nodes without workers: " + ", ".join(idle))
    if nodes is None:
        lines.append("no agent answered")
    elif len(answers) < nodes:
        lines.append("only %d of %d nodes answered in time" % (len(answers), nodes))
    return "\n".join(lines)


# -------------------------------------------------------------------------- File timer: worker side

_PID_T_MAX = (1 << 31) - 1  # a request's pid and signal must fit the kernel's int
_NSIG = signal.NSIG         # and a signal to send is below this


class FileTimerRequest:
    """One timer request as it travels on the pipe (torch's class, for clients of one's own):
    ``to_json()`` is the line a FileTimerServer reads, written with a newline in one ``write``. A
    negative ``expiration_time`` (epoch seconds) releases the timer of (``worker_pid``,
    ``scope_id``); ``signal`` is what the server sends that process when the timer expires."""

    __slots__ = ("version", "worker_pid", "scope_id", "expiration_time", "signal")

    def __init__(self, worker_pid, scope_id, expiration_time, signal=0):
        self.version = 1
        self.worker_pid = worker_pid
        self.scope_id = scope_id
        self.expiration_time = expiration_time
        self.signal = signal

    @property
    def worker_id(self):   # torch's name for it, from its generic TimerRequest
        return self.worker_pid

    def _fields(self):
        return (self.version, self.worker_pid, self.scope_id, self.expiration_time, self.signal)

    def __eq__(self, other):
        return isinstance(other, FileTimerRequest) and self._fields() == other._fields()

    __hash__ = None   # mutable, compared by value

    def __repr__(self):
        return "FileTimerRequest(worker_pid=%r, scope_id=%r, expiration_time=%r, signal=%r)" % (
            self.worker_pid, self.scope_id, self.expiration_time, self.signal)

    def to_json(self):
        import json
        return json.dumps({"version": self.version, "pid": self.worker_pid, "scope_id": self.scope_id,
                           "expiration_time": self.expiration_time, "signal": self.signal})


class FileTimerClient:
    """Sends timer requests to a ``FileTimerServer`` through its named pipe (torch's format).

    ``signal`` is what the server sends this process when a scope expires (SIGKILL by default; zero
    or negative means "tell the agent, don't kill"). Each request opens the pipe without blocking,
    so a missing server raises ``BrokenPipeError`` at once instead of hanging the worker.
    """

    def __init__(self, file_path, signal=signal.SIGKILL):
        self.file_path = file_path
        self.signal = int(signal)
        if not -_PID_T_MAX <= self.signal < _NSIG:  # the server would refuse every request
            raise ValueError("FileTimerClient(signal=%r): not a signal number" % (signal,))

    def acquire(self, scope_id, expiration_time):
        self._send(scope_id, float(expiration_time), self.signal)

    def release(self, scope_id):
        self._send(scope_id, -1, 0)

    def _send(self, scope_id, expiration_time, sig):
        import select
        line = FileTimerRequest(os.getpid(), scope_id, expiration_time, sig).to_json() + "\n"
        data = line.encode("utf-8")
        limit = getattr(select, "PIPE_BUF", 512)
        if len(data) > limit:
            raise ValueError("timer request of %d bytes exceeds PIPE_BUF (%d): use a shorter scope id"
                             % (len(data), limit))
        try:
            fd = os.open(self.file_path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:  # ENXIO: nobody reads the pipe; ENOENT: no pipe at all
            raise BrokenPipeError("no FileTimerServer is serving %s (%s)" % (self.file_path, e.strerror)) from e
        try:
            deadline = time.monotonic() + 5.0
            while True:
                try:
                    os.write(fd, data)  # one write <= PIPE_BUF: atomic, never interleaved
                    return
                except BlockingIOError:  # pipe full: the server is behind, give it a moment
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BrokenPipeError("FileTimerServer at %s is not reading its pipe" % self.file_path)
                    select.select([], [fd], [], left)
        finally:
            os.close(fd)


_timer_client_configured = None
_scope_ids = itertools.count(1)  # next() on a count is atomic: no lock needed at import time


def configure(client):
    """Set the timer client that ``expires`` uses when it is given none."""
    global _timer_client_configured
    _timer_client_configured = client


class expires:
    """``with expires(after=5): step()``: the agent kills this process if the block overruns.

    ``scope`` names the timer in the agent's report; by default it is the caller's ``file:line``
    plus a unique number, so nested and recursive blocks keep separate timers. Without ``client``
    and without ``configure()``, a worker started with ``TORCHELASTIC_TIMER_FILE`` configures itself.
    """

    def __init__(self, after, scope=None, client=None):
        if not after >= 0:  # NaN too: the server would refuse the request
            raise ValueError("expires(after=%r): the time limit must be a number >= 0" % (after,))
        self.after = after
        self.client = client
        if scope is None:
            caller = sys._getframe(1)
            scope = "%s:%d#%d" % (caller.f_code.co_filename, caller.f_lineno, next(_scope_ids))
        self.scope = scope

    def __enter__(self):
        if self.client is None:
            self.client = _default_timer_client()
        self.client.acquire(self.scope, time.time() + self.after)
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            self.client.release(self.scope)
        except BrokenPipeError:
            if exc_type is None:
                raise
            # the agent is already gone: let the block's own exception through, not ours
        return False


def _default_timer_client():
    global _timer_client_configured
    if _timer_client_configured is None:
        path = os.environ.get(TORCHELASTIC_TIMER_FILE)
        if not path:
            raise RuntimeError("expires() needs a timer client: call configure(FileTimerClient(path)) "
                               "or run under the launcher with the file timer on")
        _timer_client_configured = FileTimerClient(path)
    return _timer_client_configured


# ------------------------------------------------------------------------------- File timer: server

_MAX_PENDING = 1 << 16        # bytes of a line without newline kept before it is dropped as garbage
_MAX_TIMERS_PER_PID = 1024    # one process's timers; more are refused (others keep theirs)
_LOG_BURST = 5                # the file timer's complaints logged in full per interval...
_LOG_SUMMARY_INTERVAL = 10.0  # ...then counted and summarised once per interval (seconds)


class _TimerFileBusy(ElasticError):
    """Another live process serves the file timer at this path (the launcher exits 2)."""


class _Throttle:
    """Complaints about bad requests: ``_LOG_BURST`` in full per interval, then one summary line,
    so a writer spewing garbage cannot flood the agent's log."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._window = None   # start of the current interval
        self._logged = 0
        self._suppressed = 0

    def warn(self, fmt, *args):
        now = self._clock()
        if self._window is None or now - self._window >= _LOG_SUMMARY_INTERVAL:
            self.flush()
            self._window, self._logged = now, 0
        if self._logged < _LOG_BURST:
            self._logged += 1
            log.warning(fmt, *args)
        else:
            self._suppressed += 1

    def due(self):
        """Seconds until a pending summary should be written, or None when there is none."""
        if not self._suppressed:
            return None
        return max(0.0, self._window + _LOG_SUMMARY_INTERVAL - self._clock())

    def flush(self):
        if self._suppressed:
            log.warning("file timer: %d more bad requests in the last %.0fs, not logged one by one",
                        self._suppressed, self._clock() - self._window)
            self._suppressed = 0


def _claim_timer_file(path):
    """Lock ``path + ".lock"`` for this process; ``_TimerFileBusy`` when a live process holds it.

    The lock dies with its holder, so a pipe left by a killed launcher is free to reuse. Returns
    the locked fd, or None where the file system refuses locks (the pipe probe still guards).
    """
    import fcntl
    lock_path = path + ".lock"
    for _ in range(100):  # a holder that unlinks its lock file while we open it: open it again
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise _TimerFileBusy(_busy_message(path, holder if holder.isdigit() else None))
        except OSError as e:  # ENOLCK and friends: no locks on this file system
            os.close(fd)
            log.debug("file timer: cannot lock %s (%s); relying on the pipe probe", lock_path, e)
            return None
        try:
            st = os.stat(lock_path, follow_symlinks=False)
            mine = os.fstat(fd)
            same = (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, b"%d\n" % os.getpid())
            return fd
        os.close(fd)
    raise _TimerFileBusy(_busy_message(path, None))


def _release_timer_file(path, fd):
    """Let go of the lock _claim_timer_file took (`fd`, or None for none)."""
    if fd is None:
        return
    try:
        st = os.stat(path + ".lock", follow_symlinks=False)
        mine = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            os.unlink(path + ".lock")  # unlinked while still locked: see _claim_timer_file
    except OSError:
        pass
    os.close(fd)


def _busy_message(path, holder):
    return ("the file timer at %s is in use by another launcher%s; give each launcher its own "
            "TORCHELASTIC_TIMER_FILE" % (path, " (pid %s)" % holder if holder else ""))


class FileTimerServer:
    """The agent's hang watchdog: reads timer requests from a FIFO and signals overrunning workers.

    ``start()`` creates the FIFO at ``file_path`` (mode 0600) and a reader thread; ``stop()`` ends
    the thread and removes the FIFO. A path that another live server reads (or whose lock file
    ``file_path + ".lock"`` another process holds) is refused with ``ElasticError``; a pipe left by a
    dead one is replaced. The thread sleeps in ``poll`` until a request arrives, the nearest timer
    expires, or a process holding timers exits (a pidfd on Linux >= 5.3 with Python >= 3.9,
    unless ``use_pidfd=False``; otherwise it checks liveness every ``max_interval`` seconds while
    timers exist).
    ``pop_expired()`` hands the agent the (pid, scope_id, expiration_time) of every timer that
    made it send a signal, for the failure report. Who may be signalled: see ``set_worker_pids``;
    a bad request line is logged (rate-limited) and skipped, and never affects other timers.
    """

    def __init__(self, file_path, run_id="", max_interval=0.1, daemon=True, *, use_pidfd=None):
        if max_interval <= 0:
            raise ValueError("max_interval must be positive, got %r" % (max_interval,))
        if use_pidfd and not hasattr(os, "pidfd_open"):
            raise ValueError("use_pidfd=True needs os.pidfd_open (Python >= 3.9 on Linux)")
        self.file_path = file_path
        self.run_id = run_id
        self.max_interval = max_interval
        self.daemon = daemon
        import threading
        self._cond = threading.Condition(threading.RLock())  # guards the fields below
        self._timers = {}        # (pid, scope_id) -> (expiration_time, signal)
        self._expired = []       # (pid, scope_id, expiration_time) signalled, not yet popped
        self._allowed = None     # worker pids (session leaders) we may signal; None = any
        self._starting = False   # workers are being started: hold, don't refuse, pids not yet named
        self._held = set()       # pids with expired timers held until the workers are named
        self._recheck = False    # the allowed set changed: the thread re-judges every timer
        self._thread = None
        self._stopping = False
        self._pipe = None        # _TimerPipe while started
        self._pids = _PidWatch(hasattr(os, "pidfd_open") if use_pidfd is None else use_pidfd)
        self._bad_lines = 0
        self._request_count = 0  # well-formed requests read (acquire and release)
        self._last_progress_time = time.time()
        self._complaints = _Throttle()
        self.before_signal = None  # called with a pid just before it is signalled (the agent asks its stack)

    # -- agent-facing API
    def start(self):
        if self._thread is not None:
            raise RuntimeError("FileTimerServer already started")
        self._pipe = _TimerPipe(self.file_path)
        self._stopping = False
        import threading
        self._thread = threading.Thread(target=self._loop, name="elastic-file-timer", daemon=self.daemon)
        self._thread.start()
        log.debug("file timer serving %s (run %s)", self.file_path, self.run_id or "-")

    def stop(self):
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping = True
        self._wake()
        thread.join()
        pipe, self._pipe = self._pipe, None
        self._pids.close()
        with self._cond:
            self._timers.clear()
            self._held.clear()
        self._complaints.flush()
        pipe.close()

    def set_worker_pids(self, pids, starting=False):
        """Only signal these workers and processes in their sessions (None, the default: anyone but
        us, 0 and 1). The agent names its workers, an empty set while it has none; it calls this
        before ``start()``, so that no request is ever judged by the default.

        ``starting=True`` while workers are being started: a timer of a pid not yet named is kept,
        and fires once the next call names it (it is refused if that call does not).
        """
        with self._cond:
            self._allowed = None if pids is None else frozenset(int(p) for p in pids)
            self._starting = bool(starting) and pids is not None
            self._recheck = True
        self._wake()

    def pop_expired(self):
        """Timers that made the server signal a process since the last call: [(pid, scope, time)]."""
        with self._cond:
            out, self._expired = self._expired, []
        return out

    def active_timers(self):
        """A snapshot of the pending timers: sorted [(pid, scope_id, expiration_time)]."""
        with self._cond:
            return sorted((pid, scope, exp) for (pid, scope), (exp, _) in self._timers.items())

    def get_last_progress_time(self):
        return self._last_progress_time

    def _wait(self, predicate, timeout):
        """Wait until ``predicate()`` holds after a watchdog pass (for tests); returns its value."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    # -- the watchdog thread
    def _wake(self):
        pipe = self._pipe
        if pipe is not None:
            pipe.wake()

    def _loop(self):
        import select
        poller = select.poll()
        poller.register(self._pipe.fifo, select.POLLIN)
        poller.register(self._pipe.wake_r, select.POLLIN)
        pending = b""
        while not self._stopping:
            try:
                pending = self._pass(poller, pending)
            except Exception as e:  # the watchdog must outlive any single bad case
                self._complaints.warn("file timer: watchdog pass failed: %s: %s", type(e).__name__, e)
                import select
                select.select([self._pipe.wake_r], [], [], self.max_interval)  # no busy loop; stop() wakes it
            with self._cond:
                self._last_progress_time = time.time()
                self._cond.notify_all()

    def _pass(self, poller, pending):
        timeout = self._poll_timeout()
        try:
            events = poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1))
        except InterruptedError:
            events = []
        for fd, _ in events:
            if fd == self._pipe.fifo:
                pending = self._read_requests(pending, poller)
            elif fd == self._pipe.wake_r:
                self._pipe.drain_wake()
            else:
                for pid in self._pids.exited(fd):
                    self._drop_pid(pid, poller)
                    log.debug("file timer: pid %d exited, dropped its timers", pid)
        with self._cond:
            recheck, self._recheck = self._recheck, False
        if recheck:
            self._judge_all(poller)
        self._expire(time.time(), poller)
        if self._pids.polling:
            self._drop_dead(poller)
        if self._complaints.due() == 0:
            self._complaints.flush()
        return pending

    def _poll_timeout(self):
        with self._cond:
            times = [exp for (pid, _), (exp, _) in self._timers.items() if pid not in self._held]
        summary = self._complaints.due()
        if not times:
            return summary
        # Cap the sleep: the wall clock may jump, and without pidfds liveness is checked by polling.
        cap = self.max_interval if self._pids.polling else 1.0
        timeout = min(max(0.0, min(times) - time.time()), cap)
        return timeout if summary is None else min(timeout, summary)

    def _read_requests(self, pending, poller):
        # At most 16 reads a pass: a writer that never stops can delay expiries by one pass only,
        # and a line with no end costs at most _MAX_PENDING bytes.
        for _ in range(16):
            lines, pending, too_long = _read_lines(self._pipe.fifo, pending)
            if lines is None:
                break
            for line in lines:
                try:
                    self._handle_line(line, poller)
                except Exception as e:  # one bad line never stops the others
                    self._malformed(line, "%s: %s" % (type(e).__name__, e))
            if too_long:
                self._malformed(too_long, "line too long")
        return pending

    def _malformed(self, line, why):
        self._bad_lines += 1
        self._complaints.warn("file timer: skipped a malformed request (%s): %r", why, line[:120])

    def _handle_line(self, line, poller):
        try:
            pid, scope, exp, sig = _timer_request(line)
        except ValueError as e:
            return self._malformed(line, str(e))
        with self._cond:  # one step for observers: counted and applied together
            self._request_count += 1
            self._apply(pid, scope, exp, sig, poller)

    def _apply(self, pid, scope, exp, sig, poller):
        if exp < 0:
            self._timers.pop((pid, scope), None)
            if not any(p == pid for p, _ in self._timers):
                self._pids.unwatch(pid, poller)
                self._held.discard(pid)
        elif pid <= 1 or pid == os.getpid():
            self._complaints.warn("file timer: refused a timer for pid %d (scope %s): never signalled",
                                  pid, scope)
        elif not self._starting and not _may_signal(self._allowed, pid):
            self._complaints.warn("file timer: refused a timer for pid %d (scope %s): not a worker of "
                                  "this agent", pid, scope)
        elif (pid, scope) not in self._timers and \
                sum(1 for p, _ in self._timers if p == pid) >= _MAX_TIMERS_PER_PID:
            self._complaints.warn("file timer: refused a timer for pid %d (scope %s): it holds %d "
                                  "already", pid, scope, _MAX_TIMERS_PER_PID)
        elif not self._pids.watch(pid, poller):
            log.debug("file timer: pid %d is gone, ignored its timer %s", pid, scope)
        else:
            self._timers[(pid, scope)] = (exp, sig)

    def _judge_all(self, poller):
        """After the allowed set changed: release what was held, refuse what is not a worker's."""
        with self._cond:
            held, self._held = self._held, set()
            if self._starting:
                return
            pids = {pid for pid, _ in self._timers}
        for pid in pids:
            if _may_signal(self._allowed, pid):
                continue
            if pid in held:  # it overran while the workers were being named
                self._complaints.warn("file timer: pid %d overran a scope but is not a worker of "
                                      "this agent; refused, not signalled", pid)
            else:  # most often a worker of the last round, being stopped
                log.debug("file timer: dropped the timers of pid %d: not a worker (any more)", pid)
            self._drop_pid(pid, poller)

    def _drop_pid(self, pid, poller):
        with self._cond:
            for key in [k for k in self._timers if k[0] == pid]:
                del self._timers[key]
            self._held.discard(pid)
        self._pids.unwatch(pid, poller)

    def _drop_dead(self, poller):
        with self._cond:
            pids = {pid for pid, _ in self._timers}
        for pid in pids:
            if not _alive(pid):
                self._drop_pid(pid, poller)

    def _expire(self, now, poller):
        with self._cond:
            due = {}
            for (pid, scope), (exp, sig) in self._timers.items():
                if exp <= now and pid not in self._held:
                    due.setdefault(pid, []).append((exp, scope, sig))
        for pid, timers in due.items():
            try:
                self._expire_pid(pid, timers, now, poller)
            except Exception as e:  # dropped, so it cannot fail again on every pass
                self._complaints.warn("file timer: could not expire pid %d's timers: %s: %s",
                                      pid, type(e).__name__, e)
                self._drop_pid(pid, poller)

    def _expire_pid(self, pid, timers, now, poller):
        timers.sort()
        exp, scope, sig = next((t for t in timers if t[2] > 0), timers[0])
        if sig <= 0:
            log.warning("file timer: pid %d overran scope %s (no signal requested)", pid, scope)
            with self._cond:
                for _, s, _ in timers:
                    self._timers.pop((pid, s), None)
            return
        with self._cond:
            may, starting = _may_signal(self._allowed, pid), self._starting
            if not may and starting:  # perhaps a worker whose pid the agent has not named yet
                self._held.add(pid)
                return
        if not may:
            self._complaints.warn("file timer: pid %d overran scope %s but is not a worker of this "
                                  "agent; refused, not signalled", pid, scope)
            self._drop_pid(pid, poller)
            return
        record = (pid, scope, exp)
        with self._cond:  # recorded first: the agent may see the death before we return
            self._expired.append(record)
        hook = self.before_signal
        if hook is not None:
            try:
                hook(pid)
            except Exception as e:  # the stack is a bonus; the kill is the job
                log.debug("file timer: asking pid %d for its stack: %s", pid, e)
        sent = self._pids.signal(pid, sig)
        if not sent:
            with self._cond:
                if record in self._expired:
                    self._expired.remove(record)
        log.warning("file timer: pid %d overran scope %s by %.3fs; %s %s", pid, scope, now - exp,
                    "sent" if sent else "could not send", _signal_name(sig))
        self._drop_pid(pid, poller)


def _may_signal(allowed, pid):
    """Whether the file timer may signal `pid`: anyone (`allowed` None), a worker named in `allowed`,
    or a process in a worker's session (workers lead their own sessions)."""
    if allowed is None or pid in allowed:
        return True
    try:
        return os.getsid(pid) in allowed
    except OSError:
        return False


class _TimerPipe:
    """The file timer's ends: the FIFO at `path` (claimed through its lock file, made with mode 0600)
    and a wake pipe that ends the watchdog's poll. ``close()`` removes the FIFO, then the claim."""

    def __init__(self, path):
        self.path = path
        self._lock_fd = _claim_timer_file(path)
        try:
            _make_fifo(path)
            # O_RDWR: we are a writer too, so open never blocks for a writer and reads never see
            # EOF when the last worker closes its end.
            self.fifo = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        except BaseException:
            _release_timer_file(path, self._lock_fd)
            raise
        self.wake_r, self._wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self._wake_w, False)

    def wake(self):
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # full: a wake-up is pending anyway
            pass

    def drain_wake(self):
        try:
            os.read(self.wake_r, 512)
        except OSError:
            pass

    def close(self):
        import stat
        for fd in (self.fifo, self.wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            # only while we hold the lock: the path is ours, not a successor's
            if stat.S_ISFIFO(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass
        _release_timer_file(self.path, self._lock_fd)


class _PidWatch:
    """The file timer's view of the processes holding timers: a pidfd per pid in the watchdog's
    poller (readable once the process exits; signals sent through it cannot hit a recycled pid),
    or, without pidfds (before Linux 5.3 or Python 3.9, or refused by seccomp), ``polling``:
    liveness checked by the server at every pass."""

    def __init__(self, use_pidfd):
        self.polling = not use_pidfd
        self._fds = {}   # pid -> pidfd

    def watch(self, pid, poller):
        """Start watching pid's exit; False when it is already dead."""
        if self.polling or pid in self._fds:
            return not self.polling or _alive(pid)
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        except OSError as e:  # ENOSYS / EPERM (seccomp): fall back to polling liveness
            log.debug("file timer: pidfd_open unavailable (%s), polling liveness", e)
            self.polling = True
            return _alive(pid)
        self._fds[pid] = fd
        import select
        poller.register(fd, select.POLLIN)
        return True

    def unwatch(self, pid, poller):
        fd = self._fds.pop(pid, None)
        if fd is not None:
            poller.unregister(fd)
            os.close(fd)

    def exited(self, fd):
        """The pids whose pidfd `fd` says they exited."""
        import select
        # Look again: this pass may have closed the pidfd the event was for and reused its number.
        return [pid for pid, pfd in list(self._fds.items())
                if pfd == fd and select.select([fd], [], [], 0)[0]]

    def signal(self, pid, sig):
        """True when `sig` was sent to `pid` (False: it is gone)."""
        fd = self._fds.get(pid)
        try:
            if fd is not None:  # race-free: the pidfd cannot name a recycled pid
                signal.pidfd_send_signal(fd, sig)
            else:
                os.kill(pid, sig)
            return True
        except ProcessLookupError:
            return False
        except OSError as e:
            log.error("file timer: cannot signal pid %d: %s", pid, e)
            return False

    def close(self):
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()


def _read_lines(fd, pending):
    """One read of a non-blocking fd: (its complete non-blank lines, the unfinished rest, a rest
    dropped for being over _MAX_PENDING bytes or b""); lines is None when nothing was there."""
    try:
        chunk = os.read(fd, 65536)
    except (BlockingIOError, InterruptedError):
        chunk = b""
    if not chunk:
        return None, pending, b""
    *lines, pending = (pending + chunk).split(b"\n")
    if len(pending) > _MAX_PENDING:
        return [line for line in lines if line.strip()], b"", pending
    return [line for line in lines if line.strip()], pending, b""


def _timer_request(line):
    """(pid, scope_id, expiration_time, signal) of one request line, every field checked; ValueError
    saying what is wrong otherwise."""
    import json
    try:
        req = json.loads(line.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError alike
        raise ValueError("not JSON: %s" % e) from None
    if not isinstance(req, dict):
        raise ValueError("not an object")
    pid, scope, exp, sig = (req.get("pid"), req.get("scope_id"), req.get("expiration_time"),
                            req.get("signal", 0))
    if req.get("version", 1) != 1:
        raise ValueError("unsupported version")
    if not _is_int(pid) or not isinstance(scope, str) or not _is_int(sig) \
            or not isinstance(exp, (int, float)) or isinstance(exp, bool):
        raise ValueError("missing or mistyped field")
    if not -_PID_T_MAX <= pid <= _PID_T_MAX:
        raise ValueError("pid out of range")
    if not -_PID_T_MAX <= sig < _NSIG:
        raise ValueError("not a signal number")
    try:
        exp = float(exp)
    except OverflowError:
        raise ValueError("expiration_time out of range") from None
    if exp != exp:  # +inf is allowed: a timer that never fires (torch takes it too)
        raise ValueError("expiration_time is NaN")
    return pid, scope, exp, sig


def _make_fifo(path):
    """A new named pipe at `path` (mode 0600), replacing a stale one; ValueError for another kind of
    file, _TimerFileBusy when a live server reads the pipe there."""
    import errno
    import stat
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISFIFO(st.st_mode):
            raise ValueError("timer file %s exists and is not a named pipe" % path)
        # Someone reading it is a live server (torch's own, or one that takes no lock): ours
        # would take its pipe away and break its workers with BrokenPipeError.
        try:
            probe = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader, a stale pipe of a dead server
                raise
        else:
            os.close(probe)
            raise _TimerFileBusy(_busy_message(path, None))
        os.unlink(path)
    os.mkfifo(path, 0o600)


def _file_timer_path(environ, directory):
    """The FIFO the agent's file timer should serve, or None when the timer is off.

    On when ``TORCHELASTIC_TIMER_FILE`` names a path (used as given) or when
    ``TORCHELASTIC_ENABLE_FILE_TIMER=1`` (then ``directory/timer.fifo``; give it a local directory
    such as the agent's temporary run folder: some network file systems refuse FIFOs).
    """
    path = environ.get(TORCHELASTIC_TIMER_FILE)
    if path:
        return path
    if environ.get("TORCHELASTIC_ENABLE_FILE_TIMER") == "1":
        return os.path.join(directory, "timer.fifo")
    return None


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


# ------------------------------------------------------------------------------------- Health check

def _health_status_fn(agent):
    """``status_fn`` for ``_HealthServer`` reading an agent's public fields (no locks needed)."""
    def status():
        state = agent.state
        return state in ("HEALTHY", "SUCCEEDED"), {
            "state": state,
            "restart_count": agent.restart_count,
            "group_rank": agent.group_rank,
            "group_world_size": agent.group_world_size,   # nodes
            "world_size": agent.world_size,               # workers (WORLD_SIZE)
            "last_progress_time": agent.last_progress_time,
        }
    return status


_HEALTH_REQUEST_TIMEOUT = 5.0  # seconds a client has to send its request and take the answer
_HEALTH_MAX_CONNECTIONS = 64   # open at once; a new one pushes out the oldest
_HEALTH_MAX_REQUEST = 8192     # bytes of request line and headers
_HTTP_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class _HealthConn:
    """One client of ``_HealthServer``: the request read so far, the answer not yet sent."""

    def __init__(self, sock, deadline):
        self.sock = sock
        self.deadline = deadline
        self.inbox = b""
        self.outbox = None   # bytes still to send once the request is answered
        self.draining = False  # answered and shut for writing: reading until the client closes


class _HealthServer:
    """``GET /healthz`` on ``port`` (0: a free one, read back from ``.port`` after ``start()``).

    ``status_fn() -> (healthy, {"state", "restart_count", "group_rank", "world_size",
    "last_progress_time", ...})`` runs on the server's thread for each request, so it must only read
    the agent's state (no locks held long). Answers 200 when healthy, else 503; JSON either way.

    One thread serves every client from a selector with non-blocking sockets: each connection has
    ``request_timeout`` seconds to send its request and take the answer, at most
    ``max_connections`` are open at once (a new one pushes out the oldest), so slow or idle clients
    cost neither threads nor the answers of others. HTTP/1.0, one request per connection.
    """

    def __init__(self, port, status_fn, host="0.0.0.0", request_timeout=_HEALTH_REQUEST_TIMEOUT,
                 max_connections=_HEALTH_MAX_CONNECTIONS):
        if not request_timeout > 0:
            raise ValueError("request_timeout must be a positive number of seconds, got %r"
                             % (request_timeout,))
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1, got %r" % (max_connections,))
        self.host = host
        self.port = int(port)
        self.status_fn = status_fn
        self.request_timeout = float(request_timeout)
        self.max_connections = int(max_connections)
        self._listener = None
        self._thread = None

    def start(self):
        import socket
        import threading
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))  # a literal address: no name lookup
            listener.listen(128)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="elastic-healthz", daemon=True)
        self._thread.start()
        log.info("health check on http://%s:%d/healthz", self.host, self.port)

    def stop(self):
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._wake_w.send(b"x")
        self._thread.join()
        listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self._thread = None

    # -- the serving thread
    def _serve(self):
        import selectors
        conns = {}   # socket -> _HealthConn
        paused_until = None  # accept() failed for want of descriptors: retry at this time
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                now = time.monotonic()
                wake_at = [c.deadline for c in conns.values()]
                if paused_until is not None:
                    wake_at.append(paused_until)
                timeout = max(0.0, min(wake_at) - now) if wake_at else None
                for key, events in sel.select(timeout):
                    if key.fileobj is self._wake_r:
                        return
                    if key.fileobj is self._listener:
                        if not self._accept(sel, conns):
                            sel.unregister(self._listener)
                            paused_until = time.monotonic() + 0.1
                        continue
                    conn = conns.get(key.fileobj)
                    if conn is not None:
                        self._step(sel, conns, conn, events)
                now = time.monotonic()
                for conn in [c for c in conns.values() if c.deadline <= now]:
                    self._close(sel, conns, conn)   # too slow: dropped unanswered
                if paused_until is not None and now >= paused_until:
                    paused_until = None
                    sel.register(self._listener, selectors.EVENT_READ)
        finally:
            for conn in list(conns.values()):
                self._close(sel, conns, conn)
            sel.close()

    def _accept(self, sel, conns):
        """Take every waiting connection; False when out of descriptors (pause accepting)."""
        import errno
        import selectors
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return True
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.debug("healthz: cannot accept (%s); dropping the oldest client", e)
                    if conns:
                        self._close(sel, conns, min(conns.values(), key=lambda c: c.deadline))
                    return False
                log.debug("healthz: accept failed: %s", e)
                return True
            sock.setblocking(False)
            if len(conns) >= self.max_connections:
                self._close(sel, conns, min(conns.values(), key=lambda c: c.deadline))
            conn = _HealthConn(sock, time.monotonic() + self.request_timeout)
            conns[sock] = conn
            sel.register(sock, selectors.EVENT_READ)

    def _step(self, sel, conns, conn, events):
        import selectors
        import socket
        if events & selectors.EVENT_READ:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                return self._close(sel, conns, conn)
            if data == b"":
                return self._close(sel, conns, conn)
            if data and not conn.draining and conn.outbox is None:
                conn.inbox += data
                answer = self._answer(conn.inbox)
                if answer is not None:
                    conn.inbox, conn.outbox = b"", answer
                    sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        if conn.outbox:
            try:
                sent = conn.sock.send(conn.outbox)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return self._close(sel, conns, conn)
            conn.outbox = conn.outbox[sent:]
            if not conn.outbox:
                # Shut our side and read until the client closes: closing with its bytes unread
                # would send a reset that can destroy the answer before the client reads it.
                try:
                    conn.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    return self._close(sel, conns, conn)
                conn.draining = True
                sel.modify(conn.sock, selectors.EVENT_READ)

    def _close(self, sel, conns, conn):
        conns.pop(conn.sock, None)
        try:
            sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _answer(self, data):
        """The whole response for the request in ``data``, or None while its headers are incomplete."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            end = data.find(b"\n\n")
        if end < 0:
            if len(data) > _HEALTH_MAX_REQUEST:
                return self._response(431, {"error": "request headers too large"})
            return None
        if end > _HEALTH_MAX_REQUEST:
            return self._response(431, {"error": "request headers too large"})
        parts = data[:end].split(b"\n", 1)[0].strip().split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return self._response(400, {"error": "bad request line"})
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            return self._response(405, {"error": "only GET /healthz is served"},
                                  extra=b"Allow: GET, HEAD\r\n")
        if target.split(b"?", 1)[0] != b"/healthz":
            return self._response(404, {"error": "not found: try GET /healthz"}, head=method == b"HEAD")
        try:
            healthy, status = self.status_fn()
            body = dict(status)
            body["healthy"] = bool(healthy)
        except Exception as e:  # a broken status callback is an unhealthy agent, not a dead server
            healthy, body = False, {"healthy": False, "error": "%s: %s" % (type(e).__name__, e)}
        return self._response(200 if healthy else 503, body, head=method == b"HEAD")

    @staticmethod
    def _response(code, body, head=False, extra=b""):
        import json
        data = (json.dumps(body, default=str, sort_keys=True) + "\n").encode("utf-8")
        header = ("HTTP/1.0 %d %s\r\nServer: elasticrun\r\nContent-Type: application/json\r\n"
                  "Content-Length: %d\r\nCache-Control: no-store\r\nConnection: close\r\n"
                  % (code, _HTTP_REASONS[code], len(data))).encode("ascii")
        return header + extra + b"\r\n" + (b"" if head else data)


# -------------------------------------------------------------------------------------------- Slurm

_SLURM_PORT = 29400


def _parse_hostlist(text):
    """Expand a Slurm host list: ``"gpu[001-003,010],cpu7"`` -> gpu001 gpu002 gpu003 gpu010 cpu7.

    Several bracket groups in one name multiply (``a[1-2]-b[3-4]`` -> a1-b3 a1-b4 a2-b3 a2-b4); zero
    padding follows the range's first number. Raises ``ValueError`` on a malformed list.
    """
    import re
    hosts = []
    for item in _split_top(text.strip(), text):
        parts = re.split(r"(\[[^\[\]]*\])", item)
        names = [""]
        for part in parts:
            if part.startswith("["):
                choices = _expand_ranges(part[1:-1], text)
            elif "[" in part or "]" in part:
                raise ValueError("malformed Slurm host list %r: unbalanced brackets" % text)
            else:
                choices = [part]
            names = [n + c for n in names for c in choices]
        hosts.extend(names)
    return hosts


def _split_top(s, text):
    """Split on the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError("malformed Slurm host list %r: nested brackets" % text)
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError("malformed Slurm host list %r: unbalanced brackets" % text)
        elif ch == "," and depth == 0:
            items.append(s[start:i])
            start = i + 1
    if depth:
        raise ValueError("malformed Slurm host list %r: unbalanced brackets" % text)
    items.append(s[start:])
    items = [x.strip() for x in items]
    if s and not all(items):
        raise ValueError("malformed Slurm host list %r: empty host name" % text)
    return [x for x in items if x]


def _expand_ranges(spec, text):
    import re
    out = []
    for r in spec.split(","):
        r = r.strip()
        m = re.match(r"^(\d+)(?:-(\d+))?$", r)
        if not m:
            raise ValueError("malformed Slurm host list %r: bad range %r" % (text, r))
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError("malformed Slurm host list %r: range %r runs backwards" % (text, r))
        if int(hi) - int(lo) >= 1 << 20:
            raise ValueError("malformed Slurm host list %r: range %r is too large" % (text, r))
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def _is_loopback_name(host):
    h = host.strip("[]").lower()
    return (h in ("localhost", "localhost.localdomain", "ip6-localhost", "::1", "0.0.0.0", "::")
            or h.startswith("127.") or h.startswith("::ffff:127.") or h.endswith(".localhost"))


def _slurm_options(environ, endpoint_given=False):
    """Launcher options from srun's environment: nnodes, node_rank, rdzv_endpoint/id/backend.

    No name is resolved. Raises ``ValueError`` (one sentence) outside srun, and for a multi-node job
    whose first node is a loopback address, where every node would rendezvous with itself (unless
    ``endpoint_given``: the user named the endpoint, so Slurm's is not used).
    """
    def get(*names):
        for name in names:
            value = environ.get(name)
            if value not in (None, ""):
                return name, value
        return names[0], None

    _, job = get("SLURM_JOB_ID", "SLURM_JOBID")
    if job is None:
        raise ValueError("--slurm needs Slurm's environment, but SLURM_JOB_ID is not set: "
                         "launch with `srun elasticrun --slurm ...`")
    values = {}
    for key, names in (("nnodes", ("SLURM_STEP_NUM_NODES", "SLURM_NNODES")),
                       ("node_rank", ("SLURM_NODEID",)),
                       ("nodelist", ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))):
        name, value = get(*names)
        if value is None:
            raise ValueError("--slurm: %s is not set; launch with `srun elasticrun --slurm ...` "
                             "(one task per node)" % name)
        values[key] = (name, value)
    try:
        nnodes, node_rank = int(values["nnodes"][1]), int(values["node_rank"][1])
    except ValueError:
        raise ValueError("--slurm: %s=%r and %s=%r must be integers" % (values["nnodes"] + values["node_rank"]))
    hosts = _parse_hostlist(values["nodelist"][1])
    if not hosts or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError("--slurm: inconsistent Slurm environment (%d nodes, node id %d, node list %r)"
                         % (nnodes, node_rank, values["nodelist"][1]))
    _, step = get("SLURM_STEP_ID", "SLURM_STEPID")
    if step is None and nnodes > 1:
        raise ValueError("--slurm: this runs in the batch script of a %d-node job, not under srun, "
                         "so only one node would join: launch with `srun elasticrun --slurm ...`" % nnodes)
    host = hosts[0]
    if nnodes > 1 and not endpoint_given and _is_loopback_name(host):
        raise ValueError("--slurm: the rendezvous endpoint %s is a loopback address but the job has %d "
                         "nodes, so every node would rendezvous with itself; fix the node names "
                         "or pass --rdzv-endpoint" % (host, nnodes))
    return {
        "nnodes": str(nnodes),
        "node_rank": node_rank,
        "rdzv_endpoint": "%s:%d" % ("[%s]" % host if ":" in host else host, _SLURM_PORT),
        "rdzv_id": job if step is None else "%s.%s" % (job, step),
        "rdzv_backend": "c10d",
    }


# --------------------------------------------------------------------------------- Pre-flight check
# `elasticrun --check [job options] SCRIPT [ARGS]` on every node, before the job. The nodes meet
# through the job's own rendezvous backend under the derived run id `<run id>.check` (so a check
# never joins, consumes or closes the job's run), each node sends one report, and the leader (the
# node serving the store, else rank 0) checks what needs two nodes, prints one table and hands every
# node its verdict::
#
#     every node: local checks -> listener on a free port -> check round -> report/<rank>
#     leader:     reads every report; connects back to each node's advertised address and port
#                 (reachability, interface, family, clock offset NTP-style: offset = t_node - (t0+t1)/2
#                 over the fastest of a few exchanges); compares versions and checksums against the
#                 most common value; prints the table; writes verdict/<rank>
#     every node: reads its verdict, logs its own failed lines, exits 0 (nothing failed anywhere) or 1
#
# A node that cannot meet the others prints its own findings and why it could not meet, and exits 1.

_CHECK_CLOCK_WARN, _CHECK_CLOCK_FAIL = 0.1, 1.0       # seconds of clock offset from the leader
_CHECK_MIN_FREE = 100 << 20                           # bytes free in the log folder
_CHECK_CONNECT_TIMEOUT = 5.0
_CHECK_COLUMNS = ("node", "address", "endpoint", "back", "clock", "ports", "python", "elasticrun",
                  "script", "args", "log dir", "gpus", "cpus")
_OK, _WARN, _FAIL = "ok", "warn", "FAIL"


class _CheckNode:
    """What one node found: a table cell per column and the problems, each (status, column, text
    that says what to do). Travels as JSON in the check round's store."""

    def __init__(self, data=None):
        data = data or {}
        self.cells = dict(data.get("cells", {}))
        self.issues = [tuple(i) for i in data.get("issues", ())]
        self.facts = dict(data.get("facts", {}))

    def cell(self, column, text, status=_OK, advice=None):
        self.cells[column] = text
        if status != _OK:
            self.issues.append((status, column, advice or text))

    def issue(self, status, column, advice):
        self.issues.append((status, column, advice))

    def failed(self):
        return any(status == _FAIL for status, _, _ in self.issues)

    def to_json(self):
        import json
        return json.dumps({"cells": self.cells, "issues": self.issues, "facts": self.facts})


def _family_name(family):
    import socket
    return "IPv6" if family == socket.AF_INET6 else "IPv4"


def _interface_of(address):
    """The name of this host's interface holding `address` (an IP string), or "?"."""
    import ipaddress
    import socket
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "?"
    if ip.is_loopback:
        return "lo"
    try:
        if ip.version == 6:
            with open("/proc/net/if_inet6") as f:   # address hex, index, prefix, scope, flags, name
                for line in f:
                    fields = line.split()
                    if len(fields) >= 6 and fields[0] == ip.packed.hex():
                        return fields[5]
            return "?"
        import fcntl
        import struct
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                # SIOCGIFADDR: the interface's primary IPv4 address at bytes 20-23 (a secondary
                # address of an interface is not seen this way: "?")
                try:
                    answer = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
                except OSError:
                    continue
                if answer[20:24] == ip.packed:
                    return name
    except OSError:
        pass
    return "?"


def _route_to(sockaddr, family):
    """This host's address on the route to `sockaddr` (a UDP connect sends nothing)."""
    import socket
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(sockaddr)
        return s.getsockname()[0]


def _resolve(host, port):
    """getaddrinfo's (family, sockaddr) list for a TCP `host:port`; OSError when it does not resolve."""
    import socket
    return [(info[0], info[4]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def _port_free(port):
    """Whether a server could bind TCP `port` on every interface of this host now, IPv4 and IPv6
    (torch's store listens on both)."""
    import errno
    import socket
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((addr, port))
        except OSError as e:
            if family == socket.AF_INET6 and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue   # no IPv6 on this host
            return False
    return True


def _sha256_file(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _module_file(name):
    """The file `python -m name` would run from the current folder, found without importing it."""
    from importlib.machinery import PathFinder
    path = [os.getcwd()] + sys.path[1:]
    spec = None
    parts = name.split(".")
    for i, part in enumerate(parts):
        spec = PathFinder.find_spec(part, path)
        if spec is None:
            return None
        path = spec.submodule_search_locations
        if path is not None and i == len(parts) - 1:   # a package: python -m runs its __main__
            spec = PathFinder.find_spec("__main__", path)
    return spec.origin if spec is not None and spec.origin not in (None, "built-in") else None


def _script_path(c):
    """The file the workers would run, or None when this node has none."""
    import shutil
    if c.mode == "module":
        return _module_file(c.script)
    if c.mode == "no_python" and os.sep not in c.script:
        return shutil.which(c.script)
    return c.script if os.path.isfile(c.script) else None


def _elasticrun_code():
    """The three modules' version and a digest of their code (catches a stale copy with the same
    version number)."""
    import hashlib
    h = hashlib.sha256()
    for module in (_store, _rdzv, sys.modules[__name__]):
        try:   # the source, also from the zipapp (which runs bytecode beside it)
            spec = getattr(module, "__spec__", None)   # under -m, __name__ is __main__, the loader's is not
            h.update(module.__loader__.get_source(spec.name if spec else module.__name__).encode())
        except (AttributeError, ImportError, OSError, TypeError):
            h.update(b"?")
    versions = {_store.__version__, _rdzv.__version__, __version__}
    return "%s %s" % ("/".join(sorted(versions)), h.hexdigest()[:8])


def _visible_gpus(environ):
    """(GPUs the workers would see, physical GPUs): nvidia-smi -L, narrowed by CUDA_VISIBLE_DEVICES
    the way CUDA reads it (up to the first entry that names no device)."""
    physical = _gpu_count()
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return physical, physical
    count = 0
    for entry in visible.split(","):
        entry = entry.strip()
        if entry.isdigit() and int(entry) < physical or entry.startswith(("GPU-", "MIG-")):
            count += 1
        else:
            break
    return min(count, physical), physical


def _human_bytes(n):
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return "%.0f%s" % (n, unit) if unit == "B" else "%.1f%s" % (n, unit)
        n /= 1024.0


def _check_log_dir(node, log_dir):
    """The log folder (or the temp folder the job would use) takes a file and has room."""
    import tempfile
    target = log_dir or tempfile.gettempdir()
    existing = os.path.abspath(target)
    while not os.path.isdir(existing):
        parent = os.path.dirname(existing)
        if parent == existing or os.path.exists(existing):
            node.cell("log dir", "unusable", _FAIL,
                      "log folder %s cannot be created here (%s is not a folder): give --log-dir a "
                      "writable folder" % (target, existing))
            return
        existing = parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".elasticrun-check-", dir=existing)
        try:
            os.write(fd, b"check\n")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        node.cell("log dir", "not writable", _FAIL,
                  "log folder %s is not writable (%s: %s): give --log-dir a folder this user may write, "
                  "or fix its permissions" % (target, existing, e.strerror or e))
        return
    st = os.statvfs(existing)
    free = st.f_bavail * st.f_frsize
    if free < _CHECK_MIN_FREE:
        node.cell("log dir", "%s free" % _human_bytes(free), _FAIL,
                  "log folder %s has only %s free: free space there or give --log-dir another folder"
                  % (target, _human_bytes(free)))
    else:
        node.cell("log dir", "ok %s free" % _human_bytes(free))


def _check_local(c, log_dir, environ):
    """Everything one node can check alone, before meeting the others."""
    import hashlib
    import json
    node = _CheckNode()
    node.facts["host"] = _hostname()
    node.facts["nproc"] = c.nproc
    python = "%d.%d.%d" % sys.version_info[:3]
    if sys.implementation.name != "cpython":
        python += " " + sys.implementation.name
    node.cell("python", python)
    node.cell("elasticrun", _elasticrun_code())
    path = _script_path(c)
    if path is None:
        node.cell("script", "missing", _FAIL, "%s %s is not on this node: copy it here (every node runs its "
                  "own copy)" % ("module" if c.mode == "module" else "script", c.script))
    else:
        try:
            node.cell("script", _sha256_file(path)[:8])
        except OSError as e:
            node.cell("script", "unreadable", _FAIL, "cannot read %s: %s" % (path, e.strerror or e))
    node.facts["script_path"] = path or c.script
    node.cell("args", hashlib.sha256(json.dumps([c.mode, c.script_args]).encode()).hexdigest()[:8])
    _check_log_dir(node, log_dir)
    gpus, physical = _visible_gpus(environ)
    node.facts["gpus"] = gpus
    if gpus and gpus < c.nproc:
        node.cell("gpus", str(gpus), _FAIL,
                  "%d workers but %d GPU(s) visible%s: lower --nproc-per-node to %d or make more GPUs "
                  "visible" % (c.nproc, gpus, " (CUDA_VISIBLE_DEVICES=%s)" % environ["CUDA_VISIBLE_DEVICES"]
                               if "CUDA_VISIBLE_DEVICES" in environ else "", gpus))
    elif gpus > c.nproc:
        node.cell("gpus", str(gpus), _WARN, "%d GPU(s) visible but only %d workers: %d GPU(s) stay idle "
                  "(--nproc-per-node gpu uses them all)" % (gpus, c.nproc, gpus - c.nproc))
    elif not gpus and physical:
        node.cell("gpus", "0 of %d" % physical, _WARN, "CUDA_VISIBLE_DEVICES=%r hides every GPU of this node"
                  % environ.get("CUDA_VISIBLE_DEVICES"))
    else:
        node.cell("gpus", str(gpus) if gpus else "none")
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    if cpus < c.nproc:
        node.cell("cpus", str(cpus), _FAIL,
                  "%d workers share %d CPU(s) this launcher may run on (affinity mask): give the node "
                  "more CPUs (srun --cpus-per-task, taskset) or lower --nproc-per-node" % (c.nproc, cpus))
    else:
        node.cell("cpus", str(cpus))
    ports = []
    if c.master_port is not None:
        free = _port_free(c.master_port)
        node.facts["master_port_free"] = free
        ports.append("master %d %s" % (c.master_port, "free" if free else "in use"))
    node.facts["ports"] = ports
    _check_endpoint_resolves(node, c.rdzv)
    return node


def _check_endpoint_resolves(node, params):
    """The rendezvous endpoint resolves here; which local address, interface and family reach it."""
    if params.backend == "etcd":
        from urllib.parse import urlsplit
        targets = [(urlsplit(url).hostname, urlsplit(url).port or 2379) for url in params.endpoints]
    else:
        targets = [(params.host, params.port)]
    resolved = []
    for host, port in targets:
        try:
            resolved.append((host, port, _resolve(host, port)))
        except (OSError, UnicodeError) as e:
            node.cell("endpoint", "no address", _FAIL, "the rendezvous endpoint %s does not resolve on this node "
                      "(%s): fix DNS or /etc/hosts here, or give --rdzv-endpoint an address" % (host, e))
            return
    node.facts["endpoints"] = [[host, port] for host, port, _ in resolved]
    family, sockaddr = resolved[0][2][0]
    node.facts["endpoint_loopback"] = _is_loopback_ip(sockaddr[0])
    try:
        local = _route_to(sockaddr, family)
        node.facts["route"] = "%s %s %s" % (local, _interface_of(local), _family_name(family))
        node.facts["endpoint_local"] = local == sockaddr[0] or node.facts["endpoint_loopback"]
    except OSError as e:
        node.facts["route"] = "no route"
        node.issue(_FAIL, "endpoint", "no route from this node to the rendezvous endpoint %s (%s): check "
                   "the network configuration" % (sockaddr[0], e.strerror or e))
    node.cell("endpoint", "resolves")


def _check_reach_endpoint(node):
    """After meeting: connect to every endpoint address as resolved here (the store host too)."""
    import socket
    bad = []
    for host, port in node.facts.get("endpoints", ()):
        try:
            socket.create_connection((host, port), timeout=_CHECK_CONNECT_TIMEOUT).close()
        except OSError as e:
            bad.append("%s:%s (%s)" % (host, port, e.strerror or e))
    if bad:
        node.cell("endpoint", "unreachable", _FAIL, "cannot connect to %s from this node: check the "
                  "firewall and that the address is the store host's" % ", ".join(bad))
    elif "endpoint" in node.cells and node.cells["endpoint"] == "resolves":
        node.cell("endpoint", "ok " + node.facts.get("route", ""))


class _CheckListener:
    """A TCP listener the leader connects back to: answers each b"t" with this node's nonce and clock
    (`clock`, time.time by default)."""

    def __init__(self, clock=time.time):
        import socket
        import threading
        self._clock = clock
        self.nonce = os.urandom(8).hex()
        try:
            self._sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            self._sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self._sock.bind(("::", 0))
        except OSError:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._sock.bind(("0.0.0.0", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name="elasticrun-check", daemon=True)
        self._thread.start()

    def _serve(self):
        import select
        while True:
            ready, _, _ = select.select([self._sock, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            try:
                conn.settimeout(_CHECK_CONNECT_TIMEOUT)
                while conn.recv(1) == b"t":
                    conn.sendall(("%s %.6f\n" % (self.nonce, self._clock())).encode())
            except OSError:
                pass
            finally:
                conn.close()

    def close(self):
        os.write(self._wake_w, b"x")
        self._thread.join()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._sock.close()


def _connect_back(node):
    """From the leader: reach `node`'s advertised address and listener; (status, cell, advice, offset)."""
    import socket
    addr, port, nonce = node.facts["addr"], node.facts["listen"], node.facts["nonce"]
    try:
        sock = socket.create_connection((addr, port), timeout=_CHECK_CONNECT_TIMEOUT)
    except OSError as e:
        return (_FAIL, "unreachable", "this node's address %s is not reachable from the leader (%s: %s): workers "
                "would not reach MASTER_ADDR here; give --local-addr an address the other nodes can reach, or "
                "open the firewall" % (addr, "port %d" % port, e.strerror or e), None)
    try:
        peer_family = _family_name(sock.family)
        best = None
        reader = sock.makefile("rb")
        for _ in range(5):
            t0 = time.time()
            sock.sendall(b"t")
            line = reader.readline().decode().split()
            t1 = time.time()
            if len(line) != 2 or line[0] != nonce:
                return (_FAIL, "wrong peer", "%s:%d answers but is not this node's check: the address %s "
                        "belongs to another machine; give --local-addr this node's own address"
                        % (addr, port, addr), None)
            sample = (t1 - t0, float(line[1]) - (t0 + t1) / 2)
            best = min(best or sample, sample)
        reader.close()
        return (_OK, "ok " + peer_family, None, best)
    except (OSError, ValueError) as e:
        return (_FAIL, "broken", "the connection back to %s:%d broke (%s)" % (addr, port, e), None)
    finally:
        sock.close()


def _common(values, leader_value):
    """The most common value (ties: the leader's)."""
    counts = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    top = max(counts.values())
    return leader_value if counts.get(leader_value) == top else max(counts, key=counts.get)


_CHECK_SAME = (
    ("python", "Python %s here, %s on most nodes: run the same Python on every node"),
    ("elasticrun", "elasticrun %s here, %s on most nodes: install the same elasticrun on every node"),
    ("script", "the script differs from most nodes (sha256 %s here, %s there): copy the same %s to every node"),
    ("args", "the script's arguments differ from most nodes (digest %s here, %s there): give every node the "
             "same command line"),
)


def _check_across(nodes, leader_rank, master_port, concurrency=32):
    """The leader's part: connect back to every node, then compare the nodes' reports."""
    from concurrent.futures import ThreadPoolExecutor
    reported = [r for r in sorted(nodes) if nodes[r] is not None]
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(reported)))) as pool:
        answers = dict(zip(reported, pool.map(lambda r: _connect_back(nodes[r]), reported)))
    for r in reported:
        node = nodes[r]
        status, cell, advice, sample = answers[r]
        node.cell("back", cell, status, advice)
        if sample is None:
            node.cell("clock", "?")
            continue
        rtt, offset = sample
        error = max(0.0, abs(offset) - rtt / 2)   # the part of the offset the round trip cannot explain
        text = "%+d ms" % round(offset * 1000)
        if error > _CHECK_CLOCK_FAIL:
            node.cell("clock", text, _FAIL, "clock %+.3f s off the leader's: log times and the root cause "
                      "across nodes go wrong; synchronise the clocks (chrony/NTP)" % offset)
        elif error > _CHECK_CLOCK_WARN:
            node.cell("clock", text, _WARN, "clock %+.0f ms off the leader's: run chrony/NTP" % (offset * 1000))
        else:
            node.cell("clock", text)
    for column, advice in _CHECK_SAME:
        values = [nodes[r].cells.get(column) for r in reported]
        common = _common(values, nodes[leader_rank].cells.get(column) if nodes.get(leader_rank) else values[0])
        for r in reported:
            mine = nodes[r].cells.get(column)
            if mine != common and mine not in ("missing", "unreadable"):
                args = (mine, common) + ((nodes[r].facts.get("script_path"),) if column == "script" else ())
                nodes[r].issue(_FAIL, column, advice % args)
    if any(nodes[r].facts.get("gpus") for r in reported):
        for r in reported:
            if not nodes[r].facts.get("gpus"):
                nodes[r].issue(_FAIL, "gpus", "no GPU visible here while other nodes have some: check the "
                               "driver (nvidia-smi -L) and CUDA_VISIBLE_DEVICES on this node")
    if master_port is not None and nodes.get(0) is not None and nodes[0].facts.get("master_port_free") is False:
        nodes[0].issue(_FAIL, "ports", "--master-port %d is in use on this node, the rank-0 node whose workers "
                       "serve it: stop what holds it or choose another port" % master_port)
    for r in reported:
        if r and nodes[r].facts.get("master_port_free") is False:
            nodes[r].issue(_WARN, "ports", "--master-port %d is in use here: this node cannot be rank 0"
                           % master_port)


def _check_table(nodes, title):
    """The table and the problem lines, as text."""
    rows = [list(_CHECK_COLUMNS)]
    for r in sorted(nodes):
        node = nodes[r]
        if node is None:
            rows.append(["%d ?" % r] + ["-"] * (len(_CHECK_COLUMNS) - 1))
            continue
        marks = {}
        for status, column, _ in node.issues:
            if marks.get(column) != "!":
                marks[column] = "!" if status == _FAIL else "?"
        row = ["%d %s" % (r, node.facts.get("host", "?"))]
        for column in _CHECK_COLUMNS[1:]:
            row.append(node.cells.get(column, "-") + marks.get(column, ""))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(_CHECK_COLUMNS))]
    lines = [title] + ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    failed = warned = 0
    for r in sorted(nodes):
        if nodes[r] is None:
            lines.append("FAIL node %d: sent no report (it died or lost the store during the check)" % r)
            failed += 1
            continue
        for status, column, advice in nodes[r].issues:
            lines.append("%-4s node %d (%s) %s: %s" % (status, r, nodes[r].facts.get("host", "?"), column, advice))
            failed += status == _FAIL
            warned += status == _WARN
    lines.append("check %s: %d node(s), %d failed line(s), %d warning(s)"
                 % ("FAILED" if failed else "passed", len(nodes), failed, warned))
    return "\n".join(lines) + "\n"


def _check_params(params):
    """The job's rendezvous settings under the check's own run id."""
    return _rdzv.RendezvousParameters(params.backend, params.endpoint, params.run_id + ".check",
                                      params.min_nodes, params.max_nodes, local_addr=params.local_addr,
                                      **params.config)


def _check_title(c):
    return "elasticrun check: run %s, rendezvous %s %s, nnodes %d:%d, %d worker(s) per node" % (
        c.rdzv.run_id, c.rdzv.backend, c.rdzv.endpoint, c.rdzv.min_nodes, c.rdzv.max_nodes, c.nproc)


def _check_alone(node, c, why):
    """This node could not meet the others: its own findings, the reason, exit 1."""
    node.issue(_FAIL, "endpoint", why)
    node.cells["ports"] = ", ".join(node.facts.get("ports", ())) or "-"
    if node.facts.get("master_port_free") is False:
        node.issue(_FAIL, "ports", "--master-port %d is in use on this node: stop what holds it or choose "
                   "another port" % c.master_port)
    sys.stdout.write(_check_table({0: node}, _check_title(c)))
    return 1


def _check_main(args, environ):
    """--check from the parsed options. A node where `--nproc-per-node gpu` finds no GPU gets a failed
    line, not the job's usage error: exiting alone would leave the others waiting for it."""
    import copy
    wants_gpu = str(args.nproc_per_node).strip() == "gpu" and not _gpu_count(environ)
    if wants_gpu:
        args = copy.copy(args)
        args.nproc_per_node = "cpu"
    c = _config_from_args(args, environ, check=True)
    _configure_logging(environ)
    problems = ["--nproc-per-node gpu but nvidia-smi -L lists no GPU on this node: check the driver "
                "(nvidia-smi) or give a number"] if wants_gpu else []
    return _run_check(c, args.log_dir, environ, problems)


def _check_addresses(node, c, handler, listener, hosts, world):
    """What the round taught this node: its address, the endpoint's real port (--standalone), whether
    the endpoint is reachable from here, and the ports it serves or needs."""
    node.facts.update(addr=handler.local_addr, listen=listener.port, nonce=listener.nonce)
    port = c.rdzv.port
    if hosts and not port:   # --standalone: the store picked its port
        port = getattr(handler.store, "port", port)
        node.facts["endpoints"] = [[host, port] for host, _ in node.facts.get("endpoints", ())]
    _check_reach_endpoint(node)
    if c.rdzv.backend != "etcd":
        node.facts["ports"].insert(0, "rdzv %d %s" % (port, "served here" if hosts else "-"))
    if hosts and c.master_port == port:
        node.issue(_FAIL, "ports", "--master-port %d is the rendezvous port, served by this node: give "
                   "the workers another port" % port)
    node.cells["ports"] = ", ".join(node.facts["ports"]) or "-"
    _check_address(node, handler.local_addr, world)


def _check_lead(c, store, rank, keys):
    """On the leading node: every report read, the job-wide checks, the table printed, and each
    node's verdict published."""
    import json
    present = keys if store.check(keys) else [key for key in keys if store.check([key])]
    reports = dict(zip(present, store.multi_get(present)))
    nodes = {r: _CheckNode(json.loads(reports[key].decode())) if key in reports else None
             for r, key in enumerate(keys)}
    if c.rdzv.backend != "etcd" and not any(n is not None and "served here" in n.cells.get("ports", "")
                                            for n in nodes.values()):
        nodes[rank].issue(_WARN, "ports", "no checking node serves the rendezvous store (a store that "
                          "outlives jobs?): if none should run, stop what serves %s" % c.rdzv.endpoint)
    _check_across(nodes, rank, c.master_port)
    sys.stdout.write(_check_table(nodes, _check_title(c)))
    sys.stdout.flush()
    ok = not any(n is None or n.failed() for n in nodes.values())
    store.multi_set(["check/verdict/%d" % r for r in range(len(keys))],
                    [json.dumps({"ok": ok, "issues": n.issues if n else []}) for n in nodes.values()])


def _check_exchange(node, c, store, rank, world, hosts):
    """Publish this node's report, let the leader (the node serving the store, else rank 0) judge
    them all, read this node's verdict; the exit status."""
    import json
    timeout = c.rdzv.read_timeout
    if hosts:
        store.set("check/host", str(rank))
    store.set("check/report/%d" % rank, node.to_json())
    keys = ["check/report/%d" % r for r in range(world)]
    leader = None
    if hosts or rank == 0:
        try:
            store.wait(keys, timeout)
        except _store.StoreTimeout:
            pass
        leader = int(store.get("check/host")) if store.check(["check/host"]) else 0
    if leader == rank:
        _check_lead(c, store, rank, keys)
    key = "check/verdict/%d" % rank
    store.wait([key], timeout + 60 + world)
    verdict = json.loads(store.get(key).decode())
    for status, column, advice in verdict["issues"]:
        (log.error if status == _FAIL else log.warning)("check: %s %s: %s", status, column, advice)
    log.info("check %s%s", "passed" if verdict["ok"] else "FAILED",
             "" if leader == rank else " (the table is on the node serving the store, or rank 0)")
    if store.add("check/finished", 1) >= world:
        store.set("check/all_finished", "1")
    if hosts:   # the others still read from our store
        try:
            store.wait(["check/all_finished"], timeout)
        except _store.StoreTimeout:
            pass
    return 0 if verdict["ok"] else 1


def _run_check(c, log_dir, environ, problems=()):
    """The pre-flight check of this node (see the section comment). Returns the exit status."""
    node = _check_local(c, log_dir, environ)
    for text in problems:
        node.issue(_FAIL, "gpus", text)
    listener = _CheckListener()
    handler = None
    try:
        try:
            handler = _rdzv.get_rendezvous_handler(_check_params(c.rdzv))
            log.info("check: meeting the other nodes (run %s.check, %s node(s), waiting up to %g s)",
                     c.rdzv.run_id, c.rdzv.min_nodes if c.rdzv.min_nodes == c.rdzv.max_nodes else
                     "%d-%d" % (c.rdzv.min_nodes, c.rdzv.max_nodes), c.rdzv.join_timeout)
            info = handler.next_rendezvous()
        except (ValueError, _rdzv.RendezvousError, _store.StoreError) as e:
            if (handler is None and node.facts.get("endpoint_local") and c.rdzv.port
                    and not _port_free(c.rdzv.port)):
                node.issue(_FAIL, "ports", "the rendezvous port %d on this node (the endpoint's host) is held "
                           "by a program that serves no store: stop it or choose another port" % c.rdzv.port)
            return _check_alone(node, c, "could not meet the other nodes through the rendezvous at %s (%s): "
                                "start the check on every node with the same options, and check that the "
                                "endpoint's host runs it and its port is open" % (c.rdzv.endpoint, e))
        hosts = bool(getattr(handler, "hosts_store", False))
        _check_addresses(node, c, handler, listener, hosts, info.world_size)
        return _check_exchange(node, c, info.store, info.rank, info.world_size, hosts)
    except (_rdzv.RendezvousError, _store.StoreError) as e:
        log.error("check: lost the other nodes during the check (%s): run it again", e)
        return 1
    except KeyboardInterrupt:
        log.error("check: interrupted")
        return 128 + signal.SIGINT
    finally:
        listener.close()
        if handler is not None:
            try:
                handler.close() if getattr(handler, "hosts_store", False) else handler.shutdown()
            except Exception as e:  # leaving is best effort
                log.debug("check: leaving the rendezvous: %s", e)


def _is_loopback_ip(text):
    import ipaddress
    try:
        return ipaddress.ip_address(text.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _check_address(node, addr, world):
    """This node's advertised address (what MASTER_ADDR is when it is rank 0) as it resolves here."""
    try:
        family, sockaddr = _resolve(addr, 0)[0]
    except (OSError, UnicodeError) as e:
        node.cell("address", "%s ?" % addr, _FAIL, "this node's address %s does not resolve here (%s): give "
                  "--local-addr an address, or fix DNS or /etc/hosts" % (addr, e))
        return
    ip = sockaddr[0]
    node.cell("address", "%s%s %s %s" % (addr, "" if ip == addr else "=" + ip, _interface_of(ip),
                                         _family_name(family)))
    if world > 1 and _is_loopback_ip(ip) and node.facts.get("endpoint_loopback") is False:
        what = "is a loopback address" if ip == addr else "resolves to the loopback address %s here (a " \
            "/etc/hosts entry?)" % ip
        node.issue(_FAIL, "address", "this node's address %s %s: the others cannot reach it and its own workers "
                   "would bind loopback; give --local-addr this node's network address" % (addr, what))

# ------------------------------------------------------------------------------------- Command line

_ENV_TRUE = ("1", "true", "yes", "on")

# (names, dest, kind, default, help). kind: "str", "int", "float", "flag".
_OPTIONS = [
    (("--nnodes",), "nnodes", "str", "1", "node count N or MIN:MAX (elastic when MIN<MAX)"),
    (("--nproc-per-node", "--nproc_per_node"), "nproc_per_node", "str", "1",
     "workers per node: N, auto, cpu or gpu"),
    (("--rdzv-backend", "--rdzv_backend"), "rdzv_backend", "str", "static", "/".join(_rdzv._BACKENDS)),
    (("--rdzv-endpoint", "--rdzv_endpoint"), "rdzv_endpoint", "str", "", "HOST[:PORT] of the rendezvous"),
    (("--rdzv-id", "--rdzv_id"), "rdzv_id", "str", "none", "run id; jobs with different ids never mix"),
    (("--rdzv-conf", "--rdzv_conf"), "rdzv_conf", "str", "", "k=v,... rendezvous settings"),
    (("--standalone",), "standalone", "flag", False, "one node, store on a free local port"),
    (("--max-restarts", "--max_restarts"), "max_restarts", "int", 0, "failure restarts of the group"),
    (("--monitor-interval", "--monitor_interval"), "monitor_interval", "float", 0.1,
     "seconds between health polls"),
    (("--start-method", "--start_method"), "start_method", "str", "spawn",
     "spawn, fork or forkserver (for --run-path)"),
    (("--role",), "role", "str", "default", "role name"),
    (("-m", "--module"), "module", "flag", False, "run the script as a module (python -m)"),
    (("--no-python", "--no_python"), "no_python", "flag", False, "run the script as a program"),
    (("--run-path", "--run_path"), "run_path", "flag", False,
     "run the script with runpy in multiprocessing workers"),
    (("--node-rank", "--node_rank"), "node_rank", "int", 0, "this node's rank (static backend)"),
    (("--master-addr", "--master_addr"), "master_addr", "str", None,
     "node 0's address (static backend; default 127.0.0.1): workers' MASTER_ADDR"),
    (("--master-port", "--master_port"), "master_port", "int", None,
     "the workers' MASTER_PORT, left free for them (default: a free port each round)"),
    (("--local-addr", "--local_addr"), "local_addr", "str", None, "this node's address"),
    (("--log-dir", "--log_dir"), "log_dir", "str", None, "directory for per-rank logs"),
    (("-r", "--redirects"), "redirects", "str", "0", "0-3 or a map 0:3,1:1"),
    (("-t", "--tee"), "tee", "str", "0", "0-3 or a map 0:3,1:1"),
    (("--local-ranks-filter", "--local_ranks_filter"), "local_ranks_filter", "str", "",
     "local ranks whose output reaches the console"),
    (("--ranks-filter", "--ranks_filter"), "ranks_filter", "str", "",
     "global ranks whose output reaches the console"),
    (("--log-line-prefix-template", "--log_line_prefix_template"), "log_line_prefix_template", "str",
     None, "tee line prefix, default [${role_name}${local_rank}]:"),
    (("--shutdown-timeout", "--shutdown_timeout"), "shutdown_timeout", "float", 30.0,
     "seconds from the termination signal to SIGKILL"),
    (("--signals-to-handle", "--signals_to_handle"), "signals_to_handle", "str",
     "SIGTERM,SIGINT,SIGHUP,SIGQUIT", "signals forwarded to the workers"),
    (("--exit-barrier-timeout", "--exit_barrier_timeout"), "exit_barrier_timeout", "float", 300.0,
     "seconds a finished node waits for the others"),
    (("--health-check-port", "--health_check_port"), "health_check_port", "int", None,
     "serve GET /healthz on this port"),
    (("--slurm",), "slurm", "flag", False, "take nnodes, endpoint and run id from srun"),
    (("--numa-binding", "--numa_binding"), "numa_binding", "str", None,
     "bind each worker to CPUs near its GPU: node, socket, exclusive or core-complex"),
    (("--virtual-local-rank", "--virtual_local_rank"), "virtual_local_rank", "flag", False,
     "LOCAL_RANK=0 for every worker, its GPU its only visible device"),
    (("--duplicate-stdout-filters", "--duplicate_stdout_filters"), "duplicate_stdout_filters", "str", "",
     "a,b: tee'd stdout lines holding a or b also go to filtered_stdout.log (,, is a comma)"),
    (("--duplicate-stderr-filters", "--duplicate_stderr_filters"), "duplicate_stderr_filters", "str", "",
     "the same for stderr, to filtered_stderr.log"),
    (("--logs-specs", "--logs_specs"), "logs_specs", "str", None,
     "torchrun's LogsSpecs entry-point name: only 'default' (the built-in one)"),
    (("--event-log-handler", "--event_log_handler"), "event_log_handler", "str", "null",
     "torchrun's event handler name: accepted and ignored"),
    (("--check",), "check", "flag", False,
     "pre-flight check on every node, same options as the job: endpoint, addresses, ports, clocks, "
     "versions, script checksum, log dir, GPUs/CPUs; no worker; exit 0/1"),
    (("--event-log", "--event_log"), "event_log", "str", None,
     "JSON-lines event log (default: events.jsonl in the run's log folder; 'none': off)"),
]


# torch.distributed.launch's options torchrun dropped: elasticrun is torchrun, so they are refused
_LAUNCH_ONLY = dict.fromkeys(("--use-env", "--use_env"), " (torch.distributed.launch's: elasticrun is "
                             "torchrun, workers always read LOCAL_RANK from the environment)")

# The status of a node excluded from its run: it left after its workers caused exclude_after
# failures, or its host came back before exclude_cooldown ended (sysexits' EX_TEMPFAIL).
_EXIT_EXCLUDED = 75


class _UsageError(ElasticError):
    """Bad arguments or an unusable environment: one line, exit status 2."""


class _Exit(Exception):
    """--help or --version was answered: leave with this status."""

    def __init__(self, code):
        Exception.__init__(self, code)
        self.code = code


class _Args:
    """The parsed command line: one attribute per option, plus the script and its arguments."""


def _usage():
    lines = ["usage: elasticrun [OPTIONS] SCRIPT [ARGS...]   (also: python3 -m elastic, python3 elastic.py)",
             "", "Launch a (multi-node) elastic job: torchrun without PyTorch. Every option also reads",
             "PET_<NAME> from the environment (PET_NPROC_PER_NODE=4); an unambiguous prefix of a long",
             "option (--nproc) is taken as that option.", ""]
    for names, dest, kind, default, text in _OPTIONS:
        flag = ", ".join(names) + ("" if kind == "flag" else " " + dest.upper())
        lines.append("  %-44s %s%s" % (flag, text, "" if kind == "flag" or default in (None, "")
                                        else " (default %s)" % default))
    lines.append("  %-44s %s" % ("-h, --help / --version", "this text / the version"))
    lines += ["", "Every launcher line starts with its time (ISO 8601, local, with the UTC offset); LOGLEVEL",
              "(DEBUG, INFO, WARNING...) sets how much is said. A second stop signal kills the workers at once.",
              "", "       elasticrun status --rdzv-endpoint HOST[:PORT] --rdzv-id ID [--json]",
              "shows a running job (round, members, nodes waiting, restarts, last failure) without changing",
              "it; elasticrun status --help for more."]
    return "\n".join(lines) + "\n"


def _parse_args(argv, environ):
    """torchrun's command line, parsed by hand (argparse would cost the launcher memory and start-up
    time): `--opt value`, `--opt=value`, `-r3`; the first other word is the script, the rest its args."""
    by_name = {}
    args = _Args()
    args._explicit = set()
    for option in _OPTIONS:
        names, dest, kind, default, _ = option
        for n in names:
            by_name[n] = option
        env_name = "PET_" + dest.upper()
        value = environ.get(env_name)
        if value is not None:
            args._explicit.add(dest)
            if kind == "flag":
                default = value.strip().lower() in _ENV_TRUE
            else:
                default = _convert(value, kind, env_name)
        setattr(args, dest, default)
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            i += 1
            break
        if not word.startswith("-") or word == "-":
            break
        name, eq, value = word.partition("=")
        if name.startswith("--") and name not in by_name:
            name = _full_name(name, by_name)   # an unambiguous prefix, as argparse allows: --redirect
        if name in ("-h", "--help"):
            sys.stdout.write(_usage())
            raise _Exit(0)
        if name == "--version":
            sys.stdout.write("elasticrun %s\n" % __version__)
            raise _Exit(0)
        if name not in by_name and not word.startswith("--") and word[:2] in by_name and len(word) > 2:
            name, eq, value = word[:2], "=", word[2:]      # -r3
        option = by_name.get(name)
        if option is None:
            raise _UsageError("unrecognized option %s%s" % (name, _LAUNCH_ONLY.get(name, "")))
        _, dest, kind, _, _ = option
        if kind == "flag":
            if eq:
                raise _UsageError("option %s takes no value" % name)
            setattr(args, dest, True)
        else:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise _UsageError("option %s needs a value" % name)
                value = argv[i]
            setattr(args, dest, _convert(value, kind, name))
        args._explicit.add(dest)
        i += 1
    if i >= len(argv):
        raise _UsageError("the following arguments are required: training_script")
    args.training_script = argv[i]
    args.training_script_args = list(argv[i + 1:])
    return args


def _full_name(name, by_name):
    """The long option `name` is a prefix of: `name` itself when it is none's; _UsageError naming the
    candidates when it is a prefix of several options (spellings of one option count once)."""
    matches = {}   # an option's first name -> the spelling `name` is a prefix of
    for n in list(by_name) + ["--help", "--version"]:
        if n.startswith("--") and n.startswith(name):
            first = next(m for m in by_name[n][0] if m.startswith("--")) if n in by_name else n
            matches.setdefault(first, n)
    if len(matches) > 1:
        raise _UsageError("ambiguous option %s could match %s" % (name, ", ".join(sorted(matches))))
    return matches.popitem()[1] if matches else name


def _convert(value, kind, name):
    try:
        result = {"str": str, "int": int, "float": float}[kind](value)
        if result != result:   # nan compares false with every bound checked later
            raise ValueError(value)
    except ValueError:
        raise _UsageError("%s: invalid %s value %r" % (name, kind, value))
    return result


def _random_uuid():
    """A random (version 4) UUID string, without importing uuid."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return "%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


def parse_min_max_nnodes(nnodes):
    """torchrun's ``--nnodes`` value as ``(min_nodes, max_nodes)``: ``"N"`` or ``"MIN:MAX"``.
    ``ValueError`` for a part that is not a number, ``RuntimeError`` for more than two parts (torch's)."""
    parts = str(nnodes).split(":")
    if len(parts) > 2:
        raise RuntimeError("nnodes=%s is not in \"MIN:MAX\" format" % nnodes)
    return int(parts[0]), int(parts[-1])


# Bounds of the numeric options: past them a value is a typo, and some would overflow a wait
# (poll takes milliseconds in a C int) or start workers until the machine gives out.
_MAX_NODES = 65536
_MAX_NPROC = 65536
_MAX_RESTARTS = 2 ** 31 - 1
_MAX_SECONDS = 1e6   # about 11.5 days


def _parse_nnodes(text):
    try:
        lo, hi = parse_min_max_nnodes(str(text).strip())
    except (ValueError, RuntimeError):
        raise _UsageError("--nnodes %r is not N or MIN:MAX" % text)
    if lo < 1 or hi < lo:
        raise _UsageError("--nnodes %r needs 1 <= MIN <= MAX" % text)
    if hi > _MAX_NODES:
        raise _UsageError("--nnodes %r: at most %d nodes" % (text, _MAX_NODES))
    return lo, hi


# A run id is data: it names the run in the store and in file names, never a path. File names get
# it encoded (_run_id_for_files); these are the ids no encoding makes usable.
_MAX_RUN_ID = 255


def _check_run_id(run_id, option="--rdzv-id"):
    if not run_id:
        raise _UsageError("%s must not be empty" % option)
    if len(run_id) > _MAX_RUN_ID:
        raise _UsageError("%s is %d characters long: at most %d" % (option, len(run_id), _MAX_RUN_ID))
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in run_id):
        raise _UsageError("%s %r must not contain control characters" % (option, run_id))


def _gpu_count(environ=None):
    """GPUs this job may use: `nvidia-smi -L`'s, narrowed by CUDA_VISIBLE_DEVICES when `environ` sets
    it (as torch.cuda.device_count() is: the list is read up to its first entry that names no GPU).
    Without `environ`, the machine's."""
    import shutil
    import subprocess
    exe = shutil.which("nvidia-smi")
    if not exe:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, timeout=10).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        return 0
    gpus = [line for line in out.splitlines() if line.startswith("GPU ")]
    visible = None if environ is None else environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return len(gpus)
    uuids = [line.rpartition("UUID: ")[2].rstrip(")").strip() for line in gpus]
    seen = set()
    for entry in (e.strip() for e in visible.split(",")):
        index = int(entry) if entry.isdigit() else next(
            (i for i, u in enumerate(uuids) if entry and u.startswith(entry)), None)
        if index is None or index >= len(gpus) or index in seen:
            break
        seen.add(index)
    return len(seen)


def _cpu_count():
    """CPUs this process may run on (its affinity mask, as torch counts them), not the machine's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _parse_nproc(text, environ=None):
    text = str(text).strip()
    if text == "cpu":
        return _cpu_count()
    if text in ("gpu", "auto"):
        n = _gpu_count(os.environ if environ is None else environ)
        if n:
            return n
        if text == "gpu":
            raise _UsageError("--nproc-per-node gpu: no GPU (nvidia-smi -L, CUDA_VISIBLE_DEVICES)")
        return _cpu_count()
    try:
        n = int(text)
    except ValueError:
        raise _UsageError("--nproc-per-node %r is not a number, auto, cpu or gpu" % text)
    if not 1 <= n <= _MAX_NPROC:
        raise _UsageError("--nproc-per-node must be between 1 and %d, got %d" % (_MAX_NPROC, n))
    return n


def _parse_rank_set(text, option):
    if not text:
        return None
    try:
        ranks = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        raise _UsageError("%s %r is not a comma-separated list of ranks" % (option, text))
    if not ranks or min(ranks) < 0:
        raise _UsageError("%s %r is not a comma-separated list of ranks" % (option, text))
    return ranks


def _parse_signals(text):
    sigs = []
    for name in text.split(","):
        name = name.strip().upper()
        if not name:
            continue
        if not name.startswith("SIG"):
            name = "SIG" + name
        sig = getattr(signal, name, None)
        if not isinstance(sig, int) or name in ("SIGKILL", "SIGSTOP"):
            raise _UsageError("--signals-to-handle: %r is not a signal that can be handled" % name)
        sigs.append(sig)
    return sigs


def _unquote(text):
    """`text` without one pair of matching outer quotes: a value quoted for a shell that never saw it
    (a job spec, a YAML file) reads as the shell would have passed it."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1].strip()
    return text


def _parse_conf(text):
    conf = {}
    for part in _unquote(text).split(","):
        if not part.strip():
            continue
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise _UsageError("--rdzv-conf %r: %r is not key=value" % (text, part))
        conf[_unquote(k)] = _unquote(v)
    return conf


class _LaunchConfig:
    """Everything the command line asks for, checked and typed: what _main builds the agent from.
    Nothing downstream looks at the parsed options again."""

    __slots__ = ("rdzv", "nproc", "role", "max_restarts", "monitor_interval", "master_addr", "master_port",
                 "start_method", "shutdown_timeout", "exit_barrier_timeout", "prefix_template", "logs",
                 "signals", "health_check_port", "script", "script_args", "mode", "slurm_token",
                 "stack_signal", "forward_signals", "event_log", "virtual_local_rank", "numa_binding",
                 "duplicate_stdout_filters", "duplicate_stderr_filters")

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields[name])


def _slurm_values(args, environ):
    """The option values with --slurm's filled in: srun's environment fills every option the command
    line and PET_* left unset. `args` is left as it was."""
    values = dict(vars(args))
    endpoint_given = "rdzv_endpoint" in args._explicit
    try:
        opts = _slurm_options(environ, endpoint_given=endpoint_given)
    except ValueError as e:
        raise _UsageError(str(e))
    values.update((dest, value) for dest, value in opts.items() if dest not in args._explicit)
    if (not endpoint_given and values["rdzv_backend"] in ("c10d", "store")
            and "is_host" not in _parse_conf(values["rdzv_conf"])):
        # Slurm numbers nodes in node-list order, so node 0 is the endpoint's host. Saying so beats
        # matching names: the list has short names where gethostname() may answer a long one.
        conf = "is_host=%d" % (values["node_rank"] == 0)
        values["rdzv_conf"] = "%s,%s" % (values["rdzv_conf"], conf) if values["rdzv_conf"] else conf
    return values


def _health_check_port(value, environ):
    name = "--health-check-port"
    if value is None:
        text = environ.get(TORCHELASTIC_HEALTH_CHECK_PORT, "").strip()
        if not text:
            return None
        name = "TORCHELASTIC_HEALTH_CHECK_PORT"
        value = _convert(text, "int", name)
    if not 0 <= value < 65536:
        raise _UsageError("%s %d is not a TCP port (0 picks a free one)" % (name, value))
    return value


def _rdzv_params(o, environ=None):
    """RendezvousParameters from the option values `o`; rendezvous.py checks them. The store gets a
    token whenever the launcher can share one (see _store_token)."""
    min_nodes, max_nodes = _parse_nnodes(o["nnodes"])
    backend, endpoint, run_id = o["rdzv_backend"], o["rdzv_endpoint"], o["rdzv_id"]
    conf = _parse_conf(o["rdzv_conf"])
    if o["standalone"]:
        if max_nodes != 1:
            raise _UsageError("--standalone runs one node, so it cannot take --nnodes %s: drop one of the "
                              "two options" % o["nnodes"])
        min_nodes = max_nodes = 1
        backend, endpoint, run_id = "c10d", "127.0.0.1:0", _random_uuid()
        conf["is_host"] = "1"
    if backend not in _rdzv._BACKENDS:
        raise _UsageError("--rdzv-backend %r is not one of %s" % (backend, ", ".join(_rdzv._BACKENDS)))
    _check_run_id(run_id)
    if backend == "static":   # torchrun's options for it: node 0 serves the store at the master address
        endpoint = endpoint or _static_store_endpoint(o["master_addr"] or "127.0.0.1", o["master_port"],
                                                      max_nodes)
        conf["rank"] = o["node_rank"]
    elif not endpoint:
        raise _UsageError("--rdzv-backend %s needs --rdzv-endpoint" % backend)
    token = _store_token(o, backend, conf, run_id, environ or {})
    try:
        job = _job_settings(o)
        params = _rdzv.RendezvousParameters(backend, endpoint, run_id, min_nodes, max_nodes,
                                            local_addr=o["local_addr"], job=job, token=token, **conf)
        if o["local_addr"] is None and params.host is not None and _is_loopback_name(params.host):
            # every node is on this machine; the host name would make each worker resolve it (slow
            # resolvers stall init_process_group for seconds). Set, not built again: the conf's
            # warnings are given once
            params.local_addr = "127.0.0.1"
    except ValueError as e:
        raise _UsageError(str(e))
    return params


def _static_store_endpoint(master_addr, master_port, nnodes):
    """Where node 0 serves the static backend's store. torchrun's workers share its own store on
    MASTER_PORT (they speak torch's store protocol to it); ours cannot, so with --master-port P the
    workers get P and the store moves: to a free port when this is the only node, else to P+1."""
    if master_port is None:
        return "%s:29500" % master_addr   # workers get a fresh port
    if nnodes == 1:
        return "%s:0" % master_addr
    if master_port + 1 > 65535:
        raise _UsageError("--master-port %d leaves no port for the launcher's store (P+1 with several "
                          "static nodes); choose a lower one or give --rdzv-endpoint" % master_port)
    return "%s:%d" % (master_addr, master_port + 1)


def _job_settings(o):
    """What the nodes of a run must share (the rendezvous refuses a node that differs): --nnodes;
    and among the nodes of one role: --nproc-per-node as given (``auto``, ``gpu`` and
    ``cpu`` compare as words, so nodes with other GPU counts still meet), and the script with its
    arguments, shortened, with a checksum of the whole (a stale argument list on one node is caught,
    cheaply). Nodes of different --role values may differ in both."""
    import json
    import zlib
    words = [flag for flag, dest in (("-m", "module"), ("--no-python", "no_python"), ("--run-path", "run_path"))
             if o[dest]] + [o["training_script"]] + list(o["training_script_args"])
    text = " ".join(words)
    if len(text) > 100:   # both ends tell: the script's path and its last arguments
        text = text[:40] + "..." + text[-57:]
    script = "%s [crc32 %08x]" % (text, zlib.crc32(json.dumps(words).encode("utf-8")))
    min_nodes, max_nodes = _parse_nnodes(o["nnodes"])
    role = " (role %s)" % o["role"]
    return {"nnodes": "%d" % min_nodes if min_nodes == max_nodes else "%d:%d" % (min_nodes, max_nodes),
            "nproc_per_node" + role: str(o["nproc_per_node"]).strip(), "script" + role: script}


def _store_token(o, backend, conf, run_id, environ):
    """The store's token when the launcher can share one and none was given (``token_file``): under
    --standalone a random one (only this process uses the store: workers never do, their
    TORCHELASTIC_USE_AGENT_STORE is False); under --slurm one every node of the job derives alike
    (_slurm_token). None otherwise: the nodes have nothing in common that others lack."""
    if "token_file" in conf or backend not in ("c10d", "store"):
        return None
    if o["standalone"]:
        return os.urandom(32).hex()
    if o["slurm"]:
        return _slurm_token(environ, run_id)
    return None


def _slurm_token(environ, run_id):
    """A token for the Slurm job's store: HMAC-SHA256 of the run id (job.step) under a per-user
    secret, ``~/.elasticrun/secret`` (0600, made on first use). Slurm's own variables are public
    (squeue shows job ids) and the home folder is the one thing every node of a job shares that other
    users cannot read. Made with link(2), so nodes racing to make it agree on one."""
    import hmac
    home = environ.get("HOME") or os.path.expanduser("~")
    folder = os.path.join(home, ".elasticrun")
    path = os.path.join(folder, "secret")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        if not os.path.exists(path):
            tmp = "%s.%d.%s" % (path, os.getpid(), os.urandom(4).hex())
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, os.urandom(32).hex().encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass   # another node of the job made it first: use theirs
            finally:
                os.unlink(tmp)
        st = os.stat(path)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise _UsageError("--slurm: %s must be yours and readable by you alone (chmod 600 %s)"
                              % (path, path))
        secret = _store._read_token_file(path)
    except (OSError, ValueError) as e:
        raise _UsageError("--slurm: cannot use the per-user secret %s (%s); give every node one with "
                          "--rdzv-conf token_file=F" % (path, getattr(e, "strerror", None) or e))
    secret = secret if isinstance(secret, bytes) else secret.encode()
    return hmac.new(secret, b"elasticrun-slurm\0" + run_id.encode("utf-8", "surrogateescape"),
                    "sha256").hexdigest()


def _config_from_args(args, environ, check=False):
    """The _LaunchConfig of parsed options (`args` is left as it was); _UsageError on a bad one.
    `check`: for --check, which reports a missing script or an unusable log folder itself."""
    o = _slurm_values(args, environ) if args.slurm else dict(vars(args))
    if check:
        o["log_dir"] = None
    if o["master_port"] is not None and not 0 < o["master_port"] < 65536:
        raise _UsageError("--master-port %d is not a TCP port" % o["master_port"])
    rdzv = _rdzv_params(o, environ)
    seconds = "must be a number of seconds between 0 and %g" % _MAX_SECONDS
    for dest, ok, text in (("max_restarts", 0 <= o["max_restarts"] <= _MAX_RESTARTS,
                            "must be between 0 and %d" % _MAX_RESTARTS),
                           ("monitor_interval", 0 < o["monitor_interval"] <= _MAX_SECONDS,
                            "must be a number of seconds > 0 and at most %g" % _MAX_SECONDS),
                           ("shutdown_timeout", 0 <= o["shutdown_timeout"] <= _MAX_SECONDS, seconds),
                           ("exit_barrier_timeout", 0 <= o["exit_barrier_timeout"] <= _MAX_SECONDS, seconds),
                           ("start_method", o["start_method"] in ("spawn", "fork", "forkserver"),
                            "is not spawn, fork or forkserver")):
        if not ok:
            raise _UsageError("--%s %s" % (dest.replace("_", "-"), text))
    modes = [m for m in ("module", "no_python", "run_path") if o[m]]
    if len(modes) > 1:
        raise _UsageError("choose at most one of -m/--module, --no-python, --run-path")
    nproc, logs = _parse_nproc(o["nproc_per_node"], environ), _logs_specs(o)
    signals = _parse_signals(o["signals_to_handle"])
    stack_signal, forward_signals = _job_signals(environ, signals)
    health_check_port = _health_check_port(o["health_check_port"], environ)
    if o["numa_binding"] is not None and o["numa_binding"] not in _NUMA_MODES:
        raise _UsageError("--numa-binding %r is not one of %s" % (o["numa_binding"], ", ".join(_NUMA_MODES)))
    if o["virtual_local_rank"] and "CUDA_VISIBLE_DEVICES" in environ:
        visible = environ["CUDA_VISIBLE_DEVICES"].split(",")
        if len(visible) < nproc:
            raise _UsageError("--virtual-local-rank: %d workers but CUDA_VISIBLE_DEVICES=%s lists %d GPUs"
                              % (nproc, environ["CUDA_VISIBLE_DEVICES"], len(visible)))
    if not (check or o["module"] or o["no_python"]) and not os.path.exists(o["training_script"]):
        raise _UsageError("no such script: %s" % o["training_script"])
    if o["no_python"]:
        _check_program(o["training_script"])
    # workers get the master address and port when asked (PET_* or the command line); else the
    # rendezvous gives them a fresh port on node 0 each round
    master_port = o["master_port"] if "master_port" in args._explicit else None
    master_addr = o["master_addr"] if "master_addr" in args._explicit else None
    return _LaunchConfig(
        rdzv=rdzv, nproc=nproc, role=o["role"],
        max_restarts=o["max_restarts"], monitor_interval=o["monitor_interval"],
        master_addr=master_addr, master_port=master_port,
        start_method=o["start_method"], shutdown_timeout=o["shutdown_timeout"],
        exit_barrier_timeout=o["exit_barrier_timeout"],
        prefix_template=o["log_line_prefix_template"] or environ.get("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"),
        logs=logs, signals=signals, health_check_port=health_check_port,
        script=o["training_script"], script_args=list(o["training_script_args"]),
        mode=modes[0] if modes else "script",
        slurm_token=bool(o["slurm"] and not o["standalone"] and rdzv.token is not None),
        stack_signal=stack_signal, forward_signals=forward_signals,
        event_log=_event_log_path(o["event_log"]), virtual_local_rank=o["virtual_local_rank"],
        numa_binding=o["numa_binding"],
        duplicate_stdout_filters=_parse_filters(o["duplicate_stdout_filters"]),
        duplicate_stderr_filters=_parse_filters(o["duplicate_stderr_filters"]))


def _parse_filters(text):
    """torchrun's comma-separated filter list: ``a,b``, with ``,,`` for a comma inside a filter."""
    return [f.replace("\0", ",") for f in text.replace(",,", "\0").split(",") if f]


def _check_program(program):
    """--no-python's program must be one exec can start: found on PATH (a bare name) or a file, and
    executable."""
    import shutil
    path = program if os.sep in program else shutil.which(program)
    if path is None or not os.path.exists(path):
        raise _UsageError("--no-python: no such program: %s" % program)
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise _UsageError("--no-python: %s is not an executable file" % program)


def _job_signals(environ, stop_signals):
    """(stack signal or None, [signals forwarded job-wide]) from ELASTICRUN_STACK_SIGNAL and
    ELASTICRUN_FORWARD_SIGNALS (default SIGUSR1,SIGUSR2; a stop signal is never among them)."""
    try:
        stack = (_parse_stack_signal(environ[_STACK_SIGNAL_VAR]) if _STACK_SIGNAL_VAR in environ
                 else _default_stack_signal())
    except ValueError as e:
        raise _UsageError(str(e))
    try:
        forward = _parse_signals(environ.get("ELASTICRUN_FORWARD_SIGNALS", "SIGUSR1,SIGUSR2"))
    except _UsageError:
        raise _UsageError("ELASTICRUN_FORWARD_SIGNALS=%r: not a list of signals that can be handled"
                          % environ.get("ELASTICRUN_FORWARD_SIGNALS"))
    if stack in forward or stack in stop_signals:
        raise _UsageError("the stack signal %s is also a signal to forward or to stop on; choose "
                          "another with ELASTICRUN_STACK_SIGNAL (or change ELASTICRUN_FORWARD_SIGNALS or "
                          "--signals-to-handle)" % _stack_signal_name(stack))
    return stack, [s for s in forward if s not in stop_signals]


def _event_log_path(value):
    """True (the default: in the run's log folder), None ('none' or empty: off), or a checked path."""
    if value is None:
        return True
    if value.strip().lower() in ("", "none", "off", "0"):
        return None
    folder = os.path.dirname(os.path.abspath(value))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise _UsageError("--event-log %s: folder %s is not a writable directory" % (value, folder))
    return os.path.abspath(value)


def _logs_specs(o):
    # torchrun loads a LogsSpecs class from the `torchrun.logs_specs` entry points; its one built-in
    # name is "default". A custom class is torch code for torch's agent: ours has only its own.
    if o["logs_specs"] not in (None, "default"):
        raise _UsageError("--logs-specs %r: elasticrun has only its built-in 'default' (torchrun's "
                          "custom torchrun.logs_specs entry points are torch classes)" % o["logs_specs"])
    streams = []
    for dest in ("redirects", "tee"):
        try:
            streams.append(Std.from_str(o[dest]))
        except ValueError as e:
            raise _UsageError("--%s: %s" % (dest, e))
    log_dir = o["log_dir"]
    if log_dir:
        try:
            os.makedirs(log_dir, exist_ok=True)
        except OSError as e:
            raise _UsageError("--log-dir %s: %s" % (log_dir, e.strerror or e))
        if not os.access(log_dir, os.W_OK | os.X_OK):
            raise _UsageError("--log-dir %s is not writable" % log_dir)
    return DefaultLogsSpecs(log_dir, streams[0], streams[1],
                            _parse_rank_set(o["local_ranks_filter"], "--local-ranks-filter"),
                            _parse_rank_set(o["ranks_filter"], "--ranks-filter"))


def _run_path_worker(script, *args):
    """Callable worker of --run-path: run the script in this (multiprocessing) process."""
    import runpy
    sys.argv = [script] + list(args)
    sys.path.insert(0, os.path.dirname(os.path.realpath(script)))
    runpy.run_path(script, run_name="__main__")


def _entrypoint(c):
    """(entrypoint, args) of the WorkerSpec for the configured script."""
    if c.mode == "run_path":
        return _run_path_worker, (c.script,) + tuple(c.script_args)
    if c.mode == "no_python":
        return c.script, c.script_args
    cmd = python_command(c.script, c.script_args, module=c.mode == "module")
    return cmd[0], cmd[1:]


_LOG_HANDLERS = []


_READ_BACK = {}   # fd of an output stream -> a read-only descriptor of the same file, or None


def _end_line(stream):
    """Start the launcher's next line on a line of its own: a worker sharing the output file may
    have left its last line unterminated. Only a regular file (a Slurm output file, a redirect)
    can be read back (through a read-only descriptor: the stream's own is write-only); a terminal
    or a pipe is left as it is."""
    try:
        stream.flush()
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return
    if fd not in _READ_BACK:
        import stat
        _READ_BACK[fd] = None
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                _READ_BACK[fd] = os.open("/proc/self/fd/%d" % fd, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass
    reader = _READ_BACK[fd]
    try:
        if reader is not None:
            size = os.fstat(reader).st_size
            if size > 0 and os.pread(reader, 1, size - 1) != b"\n":
                stream.write("\n")
    except (OSError, ValueError):
        pass


class _LineFormatter(logging.Formatter):
    """``2026-12-07T14:03:07.125+01:00 [elasticrun] message``: ISO 8601 local time with its UTC
    offset and milliseconds (as syslog's RFC 5424 and Slurm's iso8601_ms write), then the level
    for warnings and errors."""

    def format(self, record):
        t = record.created
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))
        offset = time.strftime("%z", time.localtime(t)) or "+0000"
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        level = "" if record.levelno < logging.WARNING else record.levelname + ": "
        return "%s.%03d%s:%s [elasticrun] %s%s" % (stamp, int(t * 1000) % 1000, offset[:3], offset[3:],
                                                   level, text)


class _LineHandler(logging.StreamHandler):
    def emit(self, record):
        _end_line(self.stream)
        logging.StreamHandler.emit(self, record)


def _no_second_round_line(record):
    """The agent says each round in full ("rendezvous round N done in ..."); rendezvous's own shorter
    INFO line for the same round would say it twice (it stays for DEBUG and for rendezvous alone)."""
    return not (record.levelno == logging.INFO and record.name == _rdzv.__name__
                and str(record.msg).startswith("rendezvous round %d of run %r complete"))


def _configure_logging(environ):
    """The launcher's one handler, for elastic's, rendezvous's and store's loggers; LOGLEVEL as in
    torchrun (a name or a number; INFO by default)."""
    level = environ.get("LOGLEVEL", "INFO").strip().upper()
    level = int(level) if level.isdigit() else getattr(logging, level, logging.INFO)
    if not isinstance(level, int):
        level = logging.INFO
    loggers = [log, logging.getLogger(_rdzv.__name__), logging.getLogger(_store.__name__)]
    for old in _LOG_HANDLERS:
        for logger in loggers:
            logger.removeHandler(old)
    del _LOG_HANDLERS[:]
    handler = _LineHandler(sys.stderr)
    _LOG_HANDLERS.append(handler)
    handler.setFormatter(_LineFormatter())
    handler.addFilter(_no_second_round_line)
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


def main(argv=None):
    """The launcher: parse, run the agent, report. Returns the exit status. Run as the program
    (``python3 elastic.py``, ``-m elastic``, the ``elasticrun`` script), it leaves with os._exit once
    everything is torn down and flushed: tearing down the interpreter's modules only adds exit time."""
    program = argv is None and (__name__ == "__main__"
                                or os.path.basename(sys.argv[0] or "").startswith("elasticrun"))
    code = _main(argv, program)
    if program:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    return code


def _main(argv, program=False):
    environ = os.environ
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["stacks"]:
        return _stacks_command(argv[1:])
    if argv[:1] == ["status"]:
        return _status_main(argv[1:], environ)
    try:
        args = _parse_args(argv, environ)
        if args.check:
            return _check_main(args, environ)
        c = _config_from_args(args, environ)
    except _UsageError as e:
        sys.stderr.write("elasticrun: error: %s\n" % e)
        return 2
    except _Exit as e:
        return e.code
    server = None
    if (from_command_line and c.mode in ("script", "module") and hasattr(os, "fork")
            and environ.get("ELASTICRUN_FORKSERVER", "0") == "1"):
        # forked now, before logging, signal handlers, threads or sockets exist in this process
        server = _ForkServer()
        if server.worker_request is not None:  # we are a worker: run the script, never the agent
            return _run_forked_worker(server.worker_request)
    _configure_logging(environ)
    stop = _StopFlag()
    previous = {}
    for sig in c.signals:
        try:
            previous[sig] = signal.signal(sig, stop.handler)
        except (ValueError, OSError):
            pass
    for sig in c.forward_signals + ([c.stack_signal] if c.stack_signal else []):
        try:
            previous[sig] = signal.signal(sig, stop.other_handler)
        except (ValueError, OSError):
            pass
    try:
        return _run_job(c, stop, server, environ)
    except _SignalStop as e:
        log.info("stopped by %s before any worker started", _signal_name(e.signum))
        return 128 + e.signum
    finally:
        stop.close()
        if server is not None:
            server.close(wait=not program)   # a program about to exit need not reap it
        for sig, old in previous.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError):
                pass


def _stacks_command(argv):
    """``elasticrun stacks --rdzv-endpoint H:P --rdzv-id ID``: every worker's stack in a live job,
    grouped by identical stack. Exit status 0 when some node answered, 1 when none did, 2 for a bad
    option."""
    import argparse
    parser = argparse.ArgumentParser(prog="elasticrun stacks", description=(
        "Print the Python stack of every worker of a running elasticrun job, grouped by identical "
        "stack (the odd rank out comes last)."))
    parser.add_argument("--rdzv-endpoint", "--rdzv_endpoint", required=True, help="the job's endpoint")
    parser.add_argument("--rdzv-id", "--rdzv_id", required=True, help="the job's run id")
    parser.add_argument("--rdzv-backend", "--rdzv_backend", default="c10d", help="c10d (default) or etcd")
    parser.add_argument("--rdzv-conf", "--rdzv_conf", default="", help="token_file=F for a store with a token")
    parser.add_argument("--timeout", type=float, default=_STACKS_TIMEOUT,
                        help="seconds to wait for every node's answer (default %g)" % _STACKS_TIMEOUT)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code
    try:
        if not 0 < args.timeout < float("inf"):
            raise _UsageError("--timeout must be a number of seconds > 0")
        if args.rdzv_backend not in ("c10d", "store", "etcd"):
            raise _UsageError("--rdzv-backend %r: stacks works with c10d and etcd" % args.rdzv_backend)
        conf = _parse_conf(args.rdzv_conf)
        conf.setdefault("join_timeout", str(args.timeout))
        if args.rdzv_backend != "etcd":
            conf["is_host"] = "0"      # a client of the job's store, never a second server
        params = _rdzv.RendezvousParameters(args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id, 1, 1, **conf)
    except (_UsageError, ValueError) as e:
        sys.stderr.write("elasticrun stacks: error: %s\n" % e)
        return 2
    _configure_logging(os.environ)
    try:
        handler = _rdzv.get_rendezvous_handler(params)
    except (ValueError, _rdzv.RendezvousError) as e:
        sys.stderr.write("elasticrun stacks: error: %s\n" % e)
        return 1
    try:
        answers, nodes = _collect_stacks(handler.store, args.rdzv_id, "%s:%d" % (_hostname(), os.getpid()),
                                         args.timeout)
    except _store.StoreError as e:
        sys.stderr.write("elasticrun stacks: error: %s\n" % e)
        return 1
    finally:
        handler.close()
    sys.stdout.write(_format_stacks(answers, nodes) + "\n")
    return 0 if answers else 1


_STATUS_USAGE = """usage: elasticrun status --rdzv-endpoint HOST[:PORT] --rdzv-id ID [--rdzv-backend c10d|etcd]
                        [--rdzv-conf token_file=PATH] [--json]

Show a running job from its rendezvous store without joining it or changing anything: the current
round, its members (host, ranks, how long ago each heartbeat was seen), nodes waiting, restarts used,
the last failure and whether the run is closed. It watches the heartbeats for about one
heartbeat_interval (--rdzv-conf heartbeat_interval=..., 5 s by default). The etcd form:
--rdzv-backend etcd --rdzv-endpoint http://host:2379. PET_RDZV_* variables work as for a launch.
"""


def _status_main(argv, environ):
    """``elasticrun status``: read a run's state from its store and print it. Exit 0, 1 when the store
    cannot be read, 2 for bad arguments."""
    import json
    options = {"--rdzv-endpoint": "rdzv_endpoint", "--rdzv-id": "rdzv_id", "--rdzv-backend": "rdzv_backend",
               "--rdzv-conf": "rdzv_conf"}
    o = {dest: environ.get("PET_" + dest.upper(), "") for dest in options.values()}
    as_json = False
    i = 0
    try:
        while i < len(argv):
            name, eq, value = argv[i].partition("=")
            name = name.replace("_", "-")
            if name in ("-h", "--help"):
                sys.stdout.write(_STATUS_USAGE)
                return 0
            if name == "--json" and not eq:
                as_json = True
            elif name in options:
                if not eq:
                    i += 1
                    if i >= len(argv):
                        raise _UsageError("option %s needs a value" % name)
                    value = argv[i]
                o[options[name]] = value
            else:
                raise _UsageError("status: unrecognized argument %s" % argv[i])
            i += 1
        if not o["rdzv_endpoint"] or not o["rdzv_id"]:
            raise _UsageError("status needs --rdzv-endpoint and --rdzv-id")
        backend = o["rdzv_backend"] or ("etcd" if o["rdzv_endpoint"].startswith("http") else "c10d")
        if backend not in ("c10d", "store", "etcd", "static"):
            raise _UsageError("status: --rdzv-backend %r is not c10d, etcd or static" % backend)
        conf = _parse_conf(o["rdzv_conf"])
        if backend == "static":
            conf.setdefault("rank", "0")
        try:
            params = _rdzv.RendezvousParameters(backend, o["rdzv_endpoint"], o["rdzv_id"], 1, 1, **conf)
        except ValueError as e:
            raise _UsageError(str(e))
    except _UsageError as e:
        sys.stderr.write("elasticrun status: error: %s\n" % e)
        return 2
    try:
        store = _rdzv.open_run_store(params, timeout=min(params.read_timeout, 10.0))
    except _rdzv.RendezvousError as e:
        sys.stderr.write("elasticrun status: error: %s\n" % e)
        return 1
    try:
        info = _run_status(store, params)
    except (_store.StoreError, _rdzv.RendezvousError, ValueError) as e:
        sys.stderr.write("elasticrun status: error: cannot read run %r: %s\n" % (params.run_id, e))
        return 1
    finally:
        store.close()
    if as_json:
        sys.stdout.write(json.dumps(info, indent=1, sort_keys=True) + "\n")
    else:
        sys.stdout.write(_format_status(info, backend, o["rdzv_endpoint"]))
    return 0


def _run_status(store, params):
    """describe_run's view of the run, with what the agents published in their rounds (elastic's
    own keys, under each round's prefix): their host, pid, ranks and restart counts, and the most
    recent failure. Reads only (check, get, multi_get)."""
    import json
    info = _rdzv.describe_run(store, params.run_id, observe=params.heartbeat_interval * 1.2)
    info["restarts"] = None
    info["max_restarts"] = None
    info["last_failure"] = None
    r = info["round"]

    def read(user, names):
        present = [n for n in names if user.check([n])]
        return dict(zip(present, user.multi_get(present))) if present else {}

    if r is not None:
        user = _store.PrefixStore(info["rounds"][r]["user_prefix"], store)
        n = len(info["members"])
        agents = read(user, ["agent/%d" % i for i in range(n)])
        roles = read(user, ["role/%d" % i for i in range(n)])
        base = 0
        for m in info["members"]:
            agent = agents.get("agent/%d" % m["rank"])
            record = json.loads(agent.decode()) if agent else {}
            role = roles.get("role/%d" % m["rank"], b"").decode().split("\n")
            nproc = int(role[1]) if len(role) == 2 else record.get("nproc")
            m.update(host=record.get("host") or m.get("host") or m["addr"], pid=record.get("pid"), role=role[0] or None,
                     restarts=record.get("restarts"), log_dir=record.get("log_dir"))
            if nproc:
                m["ranks"] = [base, base + nproc - 1]
                base += nproc
            if record.get("restarts") is not None:
                info["restarts"] = max(info["restarts"] or 0, record["restarts"])
                info["max_restarts"] = record.get("max_restarts")
    for rr in sorted(info["rounds"], reverse=True):
        user = _store.PrefixStore(info["rounds"][rr]["user_prefix"], store)
        if not user.check(["failed"]):
            continue
        found = read(user, ["failure/%d" % i for i in range(info["rounds"][rr]["nodes"])])
        failures = {}
        for value in found.values():
            for rank, d in json.loads(value.decode()).items():
                failures[int(rank)] = ProcessFailure._from_dict(d)
        if failures:
            rank, f = _first(failures)
            info["last_failure"] = dict(_failure_fields(rank, f, len(failures)), round=rr)
            break
    info["rounds"] = {str(k): v for k, v in info["rounds"].items()}
    return info


def _format_status(info, backend, endpoint):
    lines = ["run %s (%s at %s)%s" % (info["run_id"], backend, endpoint, ": closed" if info["closed"] else "")]
    if info["round"] is None:
        lines.append("  no round has formed yet")
    else:
        state = "broken: %s" % info["broken"] if info["broken"] else "running"
        lines.append("  round %d: %s, master %s, %s" % (info["round"], _plural(len(info["members"]), "node"),
                                                        info["master"], state))
        for m in info["members"]:
            age = m.get("heartbeat_age")
            beat = ("heartbeat %.1f s ago" % age if isinstance(age, (int, float))
                    else "heartbeat key gone" if age == "gone"
                    else "no heartbeat seen while watching")
            ranks = "ranks %d-%d" % tuple(m["ranks"]) if m.get("ranks") else "ranks ?"
            lines.append("    node %d: %s (%s), %s, pid %s, %s" % (m["rank"], m.get("host") or m["addr"],
                                                                    m["addr"], ranks, m.get("pid") or "?", beat))
    waiting = info["waiting"]
    nnodes = str(info.get("settings", {}).get("nnodes", ""))
    full = bool(nnodes) and info["round"] is not None and not info["broken"] and len(info["members"]) >= int(
        nnodes.rpartition(":")[2])
    lines.append("  nodes waiting: %d%s" % (len(waiting), " (%s)" % ", ".join(
        w["addr"] + (" spare" if full and not w.get("rejoin") else "") for w in waiting) if waiting else ""))
    if info["restarts"] is not None:
        lines.append("  restarts used: %s of %s" % (info["restarts"], info["max_restarts"]))
    f = info["last_failure"]
    if f:
        lines.append("  last failure (round %s): rank %s on %s, pid %s, %s: %s" % (
            f["round"], f["rank"], f["failure_host"], f["pid"], _how_ended(f), f["message"]))
    else:
        lines.append("  last failure: none")
    return "\n".join(lines) + "\n"


def _run_job(c, stop, server, environ):
    """Build the agent from the config through its public arguments, run it, report from its
    RunResult. Returns the exit status."""
    try:
        with stop:   # nothing to lose yet: a signal may interrupt joining the store
            handler = _rdzv.get_rendezvous_handler(c.rdzv)
    except (ValueError, _rdzv.RendezvousError) as e:
        hint = ""
        if c.slurm_token and isinstance(e.__cause__, _store.StoreAuthError):
            hint = ("; under --slurm each node derives the token from ~/.elasticrun/secret, so every node "
                    "needs the same file (a shared home folder), or pass --rdzv-conf token_file=F")
        sys.stderr.write("elasticrun: error: %s%s\n" % (e, hint))
        return 2
    entrypoint, args = _entrypoint(c)
    spec = WorkerSpec(c.role, c.nproc, entrypoint, args, rdzv_handler=handler, max_restarts=c.max_restarts,
                      monitor_interval=c.monitor_interval, master_addr=c.master_addr,
                      master_port=c.master_port, local_addr=c.rdzv.local_addr,
                      virtual_local_rank=c.virtual_local_rank, numa_binding=c.numa_binding,
                      duplicate_stdout_filters=c.duplicate_stdout_filters,
                      duplicate_stderr_filters=c.duplicate_stderr_filters)
    agent = LocalElasticAgent(spec, logs_specs=c.logs, start_method=c.start_method,
                              exit_barrier_timeout=c.exit_barrier_timeout, shutdown_timeout=c.shutdown_timeout,
                              log_line_prefix_template=c.prefix_template,
                              health_check_port=c.health_check_port, fork_server=server, stop_flag=stop,
                              adopt_orphans=True, stack_signal=c.stack_signal or 0, event_log=c.event_log)
    try:
        return _agent_outcome(agent, c, stop, environ)
    finally:
        # as torch's launcher does; the agent's run() has left already (leaving twice is harmless), but
        # a run() that never got that far has not
        try:
            handler.shutdown()
        except Exception as e:  # never let a leaving-the-run error hide the outcome
            log.debug("rendezvous shutdown: %s", e)


def _agent_outcome(agent, c, stop, environ):
    """Run the agent; the exit status of its RunResult (or of the error that ended it)."""
    try:
        result = agent.run()
    except _SignalStop as e:
        return 128 + e.signum     # the agent said what it stopped
    except _rdzv.RendezvousExcludedError as e:
        log.error("excluded: %s", e)
        return _EXIT_EXCLUDED
    except (_rdzv.RendezvousMismatchError, _rdzv.RendezvousClosedError) as e:
        if isinstance(e, _rdzv.RendezvousClosedError) and not e.late:
            log.error("rendezvous failed: %s", e)
            return 1
        sys.stderr.write("elasticrun: error: %s\n" % e)    # a mistake in the options (--rdzv-id...)
        return 2
    except _rdzv.RendezvousError as e:
        log.error("rendezvous failed: %s", e)
        return 1
    except _TimerFileBusy as e:
        sys.stderr.write("elasticrun: error: %s\n" % e)
        return 2
    except (ElasticError, OSError) as e:
        if isinstance(e, _SignalStop):
            raise
        log.error("the agent failed: %s", e)
        return 1
    stop.check()   # a signal that came while the agent could not be interrupted
    if not result.is_failed():
        return 0
    err = ChildFailedError(c.script, result.failures, result.outlived_grace)
    _end_line(sys.stderr)
    sys.stderr.write(_format_report(c.script, result.failures, result.outlived_grace,
                                    restarts=(result.restart_count, c.max_restarts),
                                    log_dir=c.logs.root_log_dir) + "\n")
    _copy_root_cause(err, environ.get("TORCHELASTIC_ERROR_FILE"))
    return result.root_cause[1].launcher_exit_code()


if __name__ == "__main__":
    sys.exit(main())
