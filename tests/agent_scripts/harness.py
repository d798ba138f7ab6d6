"""Helpers the launcher tests share: start elasticrun / store.py processes, wait for files, look at /proc."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
SCRIPTS = os.path.join(TESTS, "agent_scripts")
ELASTIC = os.path.join(ROOT, "elastic.py")


def env(**extra):
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("TORCHELASTIC_ERROR_FILE", None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def clean_env(**extra):
    """env() without the SLURM_*, PET_* and TORCHELASTIC_* variables the developer's shell may hold."""
    e = env()
    for k in list(e):
        if k.startswith(("SLURM_", "PET_", "TORCHELASTIC_")):
            del e[k]
    e.update({k: str(v) for k, v in extra.items()})
    return e


def write_script(folder, name, text):
    path = os.path.join(str(folder), name)
    with open(path, "w") as f:
        f.write(text)
    return path


class Launcher:
    """One `python3 elastic.py ...` in its own session, output in files; always killed in stop()."""

    def __init__(self, args, tmp, name="agent", environ=None, cmd=None):
        self.out_path = os.path.join(str(tmp), name + ".out")
        self.err_path = os.path.join(str(tmp), name + ".err")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen((cmd or [sys.executable, ELASTIC]) + list(args), stdout=out,
                                         stderr=err, env=environ or env(), start_new_session=True)

    @property
    def pid(self):
        return self.proc.pid

    def wait(self, timeout=60):
        return self.proc.wait(timeout)

    def out(self):
        with open(self.out_path) as f:
            return f.read()

    def err(self):
        with open(self.err_path) as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait()


class StoreProcess:
    """`python3 store.py` on a free port of 127.0.0.1, for agents that must outlive each other."""

    def __init__(self, token_file=None):
        token = ["--token-file", token_file] if token_file else []
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "store.py"), "--host", "127.0.0.1",
                                      "--port", "0"] + token, stdout=subprocess.PIPE, env=env())
        line = self.proc.stdout.readline().decode()
        if not line.startswith("listening on"):
            self.stop()
            raise RuntimeError("store.py said %r" % line)
        self.port = int(line.rsplit(":", 1)[1])
        self.endpoint = "127.0.0.1:%d" % self.port

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


def wait_for(condition, timeout=60, what="condition", explain=None):
    """Poll `condition` until it returns something true, and return that. For states other processes
    produce (files, log lines, a remote metric): there is no event to wait on. The timeout is a hang
    guard only; on it, AssertionError names `what`, followed by `explain()` when given."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s%s" % (what, "\n" + explain() if explain else ""))
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def dumps(out_dir):
    """{file stem: env dict} of everything envdump.py wrote."""
    result = {}
    for path in glob.glob(os.path.join(str(out_dir), "*.json")):
        with open(path) as f:
            result[os.path.basename(path)[:-5]] = json.load(f)
    return result


def alive(pid):
    """True while `pid` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def pid_files(out):
    """The pids workers wrote, one a file, to OUT/pid_* (an empty file: not written yet)."""
    pids = []
    for path in glob.glob(os.path.join(str(out), "pid_*")):
        with open(path) as f:
            text = f.read()
        if text:
            pids.append(int(text))
    return pids
