"""Starts two processes that leave the worker's session, as daemons do, writes the worker's pid and
theirs to OUTDIR/pids_<rank>_<restart> once both are up, then sleeps for good:
- a child started with start_new_session=True that, on SIGTERM, writes <its pid file>.term and exits
  (it shows the grace period: SIGTERM first);
- a double-forked daemon (its parents exit, so it is nobody's child we know of) that ignores
  SIGTERM: only a SIGKILL removes it.
Neither is in the worker's process group, so only the environment mark can find them."""
import os
import subprocess
import sys
import time

CHILD = r"""
import os, signal, sys, time
path = sys.argv[2]
if sys.argv[1] == "daemon":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
else:
    def term(*_):
        open(path + ".term", "w").close()
        os._exit(0)
    signal.signal(signal.SIGTERM, term)
with open(path + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(path + ".tmp", path)
while True:
    time.sleep(1000)
"""


def start(kind, path):
    # stdio to /dev/null: the launcher's pipes must not wait for a process it is meant to kill
    subprocess.Popen([sys.executable, "-c", CHILD, kind, path], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_pid(path):
    while not os.path.exists(path):
        time.sleep(0.01)
    with open(path) as f:
        return int(f.read())


out = sys.argv[1]
rank, restart = os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
stem = os.path.join(out, "%s_%s_%s" % ("%s", rank, restart))
start("session", stem % "session")
start("daemon", stem % "daemon")
pids = [os.getpid(), read_pid(stem % "session"), read_pid(stem % "daemon")]
with open(stem % "pids" + ".tmp", "w") as f:
    f.write(" ".join(map(str, pids)))
os.replace(stem % "pids" + ".tmp", stem % "pids")
while True:
    time.sleep(1000)
