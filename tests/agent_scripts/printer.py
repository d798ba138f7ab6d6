"""Prints one line on stdout and one on stderr, tagged with the rank."""
import os
import sys

print("out of rank %s" % os.environ["RANK"])
print("err of rank %s" % os.environ["RANK"], file=sys.stderr)
