"""Running our launcher the way torch's launcher tests run torchrun: ``torchrun ARGS`` becomes
``python elastic.py ARGS``, in its own session, torn down whatever happens.

torch's cases call ``torch.distributed.run.main(args)`` in-process, where a worker failure raises
ChildFailedError and a bad option raises ValueError. Run as a program, torchrun turns both into a
non-zero exit; the ported cases run ``elastic.py`` as a program and assert on that, plus enough of
the output to tell which of the two it was.
"""
import os
import signal
import subprocess
import sys

from ports import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ELASTIC = os.path.join(ROOT, "elastic.py")
HANG_GUARD = 120   # seconds: only catches a hang, never times anything


def path(script):
    return os.path.join(HERE, script)


def clean_env(**extra):
    """The test's environment without launcher leftovers, plus torch's sentinel and `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PET_", "TORCHELASTIC_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(TEST_SENTINEL_PARENT="FOOBAR", PYTHONUNBUFFERED="1")
    # torch's CI has the default master port 29500 to itself; here other jobs may hold it, so the
    # static backend's default port is a free one (an explicit --master-port still wins)
    env["PET_MASTER_PORT"] = str(free_port())
    env.update(extra)
    return env


class Run:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    def __repr__(self):
        return "exit %s\n--- stdout\n%s\n--- stderr\n%s" % (self.returncode, self.stdout[-3000:],
                                                           self.stderr[-3000:])


class Launcher:
    """One launcher process; `wait()` collects it, `kill()` tears its session down."""

    def __init__(self, args, python=None, env=None, cwd=None):
        self.proc = subprocess.Popen([python or sys.executable, ELASTIC] + list(args),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, env=env or clean_env(), cwd=cwd,
                                     start_new_session=True)

    def wait(self, timeout=HANG_GUARD):
        out, err = self.proc.communicate(timeout=timeout)
        return Run(self.proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


def launch(args, python=None, env=None, cwd=None):
    """``torchrun args`` with our launcher: run it to the end and return a Run."""
    launcher = Launcher(args, python, env, cwd)
    try:
        return launcher.wait()
    finally:
        launcher.kill()
