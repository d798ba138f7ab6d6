"""Prints argv[1] lines of about 100 bytes, each `rank R line I xxx...`, with plain print() (the
tests count lines that two ranks' text shares). As a callable worker: `lines(n)`."""
import os
import sys


def lines(count):
    rank = os.environ["RANK"]
    for i in range(int(count)):
        print("rank %s line %d %s" % (rank, i, "x" * 80))


if __name__ == "__main__":
    lines(sys.argv[1])
