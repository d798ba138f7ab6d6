"""Forks CHILDREN grandchildren that sleep, writes every pid to OUTDIR/pids_<rank>, then behaves:
`sleep` (forever), `fail` (exit 3 once the pids are written)."""
import os
import sys
import time

out, mode = sys.argv[1], sys.argv[2]
pids = [os.getpid()]
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        # a grandchild that ignores SIGTERM: only SIGKILL of the group removes it
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1000)
    pids.append(pid)
rank = os.environ["RANK"]
tmp = os.path.join(out, "pids_%s.tmp" % rank)
with open(tmp, "w") as f:
    f.write(" ".join(map(str, pids)))
os.replace(tmp, os.path.join(out, "pids_%s" % rank))
if mode == "fail":
    sys.exit(3)
while True:
    time.sleep(1000)
