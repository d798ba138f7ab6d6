"""Forks two grandchildren that ignore SIGTERM, writes every pid to OUTDIR/pids_<rank>_<restart>, then:
mode `sleep`: sleeps for good; mode `fail`: rank 0 exits 3 once every rank wrote its pids."""
import glob
import os
import signal
import sys
import time

out, mode = sys.argv[1], sys.argv[2]
pids = [os.getpid()]
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # only SIGKILL of the group removes it
        while True:
            time.sleep(1000)
    pids.append(pid)
rank, restart = os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
tmp = os.path.join(out, "pids_%s_%s.tmp" % (rank, restart))
with open(tmp, "w") as f:
    f.write(" ".join(map(str, pids)))
os.replace(tmp, os.path.join(out, "pids_%s_%s" % (rank, restart)))
if mode == "fail" and rank == "0":
    while len(glob.glob(os.path.join(out, "pids_*_%s" % restart))) < int(os.environ["WORLD_SIZE"]):
        time.sleep(0.01)
    sys.exit(3)
while True:
    time.sleep(1000)
