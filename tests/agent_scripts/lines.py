"""Prints argv[1] lines of about 100 bytes, each `rank R line I xxx...`, with plain print(), all ranks
at once: each first waits until every rank of the node has arrived in the folder argv[2] (the tests
count lines that two ranks' text shares). As a callable worker: `lines(n, folder)`."""
import os
import sys
import time


def lines(count, folder):
    rank = os.environ["RANK"]
    open(os.path.join(folder, rank), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(folder)) < int(os.environ["LOCAL_WORLD_SIZE"]) and time.monotonic() < deadline:
        time.sleep(0.001)
    for i in range(int(count)):
        print("rank %s line %d %s" % (rank, i, "x" * 80))


if __name__ == "__main__":
    lines(sys.argv[1], sys.argv[2])
