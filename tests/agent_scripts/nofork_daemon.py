"""Leaves a daemon the way a careless library does: fork without exec, setsid, fork again, so the
daemon is in no worker group and carries the launcher's environment, not the worker's. Writes the
worker's and the daemon's pid to OUTDIR/pids_<rank>_<restart>, then: mode `sleep` sleeps for good;
mode `fail`: rank 0 exits 3 once every rank wrote its pids."""
import glob
import os
import signal
import sys
import time


def main(out, mode):
    rank, restart = os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)   # only a SIGKILL removes it
            os.write(w, b"%d\n" % os.getpid())
            while True:
                time.sleep(1000)
        os._exit(0)
    daemon = int(os.read(r, 64))
    tmp = os.path.join(out, "pids_%s_%s.tmp" % (rank, restart))
    with open(tmp, "w") as f:
        f.write("%d %d" % (os.getpid(), daemon))
    os.replace(tmp, os.path.join(out, "pids_%s_%s" % (rank, restart)))
    if mode == "fail" and rank == "0":
        while len(glob.glob(os.path.join(out, "pids_*_%s" % restart))) < int(os.environ["WORLD_SIZE"]):
            time.sleep(0.01)
        sys.exit(3)
    while True:
        time.sleep(1000)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
