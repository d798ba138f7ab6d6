"""Writes argv[1] numbered lines to stdout (far more than a pipe holds), then one without a newline,
and one line to stderr."""
import os
import sys

rank = os.environ["RANK"]
for i in range(int(sys.argv[1])):
    print("rank %s line %d %s" % (rank, i, "x" * 40))
sys.stdout.write("rank %s last line, no newline" % rank)
print("err of rank %s" % rank, file=sys.stderr)
