"""A worker for the bad-node tests: `flaky.py DIR`.

On a node whose launcher has BAD_NODE=1: waits until DIR/go exists, then exits 3 (every time).
Elsewhere: waits until DIR/ok exists, writes DIR/done_<NODE>_<RANK>_<WORLD_SIZE> and exits 0.
"""
import os
import sys
import time

folder = sys.argv[1]
bad = os.environ.get("BAD_NODE") == "1"
flag = os.path.join(folder, "go" if bad else "ok")
while not os.path.exists(flag):
    time.sleep(0.02)
if bad:
    sys.exit(3)
name = "done_%s_%s_%s" % (os.environ.get("NODE", "?"), os.environ["RANK"], os.environ["WORLD_SIZE"])
open(os.path.join(folder, name), "w").close()
